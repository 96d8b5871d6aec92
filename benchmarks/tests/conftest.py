"""Tests of the benchmark harness (not of p3m-jax itself): its scripts import each other as
siblings, so benchmarks/ goes on the path; JAX stays on the CPU."""

import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
BENCHMARKS = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(1, str(BENCHMARKS.parent))
