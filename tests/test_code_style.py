"""One code style: the repository is formatted with ruff (format) and passes its lint rules
(`[tool.ruff]` in pyproject.toml). Fix a failure with `ruff format . && ruff check --fix .`."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_repository_is_formatted_and_lint_clean():
    formatted = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "."], cwd=REPO, capture_output=True, text=True
    )
    assert formatted.returncode == 0, "not formatted (run `ruff format .`):\n" + formatted.stdout[-3000:]
    linted = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout[-3000:]
