#!/usr/bin/env bash
# Rewrites requirements.lock: the newest versions that pyproject.toml's bounds allow, installed in a fresh
# virtual environment with the test extra, frozen exactly (PyTorch as its CPU build's version).
# Run it from the repository root, then run the tests (`.ci/run`) before committing the new lock.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q ".[test]"
{
  echo "# Exact versions the tests passed with: pip install -c requirements.lock \".[test]\" (tools/update_lock.sh rewrites it)."
  "$venv/bin/python" -m pip freeze --all --exclude-editable | grep -v -E '^(pip|p3m-jax)(==| @)' | sed -E 's/\+cpu$//'
} > requirements.lock
rm -rf "$(dirname "$venv")"
echo "wrote requirements.lock ($(grep -c '==' requirements.lock) packages)"
