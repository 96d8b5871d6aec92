"""Shared pieces of the training-loop tests: a tiny configuration and its command line, running
`python -m p3m_jax.main` in a subprocess with the stand-in model, comparing trees."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

from p3m_jax.configs import default as default_config
from p3m_jax.weights.workdir_checkpoints import restore_variables

REPO = pathlib.Path(__file__).resolve().parents[1]
TFDS_NAME = "p3m10k/synthetic_64x64_12_2_2"


def tiny_config(data_dir, **overrides):
    """The quickstart config shrunk to seconds: 64x64 crops of 64x64 images, batch 2."""
    config = default_config.get_config()
    config.data.tfds_name = TFDS_NAME
    config.data.data_dir = data_dir
    config.data.image_size = 64
    config.data.crop_sizes = (64,)
    config.data.trimap_kernel_range = (3, 5)
    config.data.validation_count = 2
    config.batch_size = 2
    config.num_train_steps = 4
    config.optimizer.schedule = "constant"
    config.log_every_steps = 1
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    config.num_summary_images = 1
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def final_params(workdir, step=None):
    _, variables = restore_variables(os.path.join(workdir, "checkpoints"), step)
    return variables


def assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def tiny_main_args(workdir, data_dir, fields: dict) -> list[str]:
    """`python -m p3m_jax.main` arguments of a tiny run: 64x64, batch 2, 2 validation images, a log
    line every step, no validation, checkpoints or test splits, unless ``fields`` (config field ->
    value) say otherwise."""
    fields = {
        "data.data_dir": data_dir,
        "data.tfds_name": TFDS_NAME,
        "data.image_size": 64,
        "data.crop_sizes": "(64,)",
        "data.validation_count": 2,
        "batch_size": 2,
        "log_every_steps": 1,
        "eval_every_steps": 0,
        "checkpoint_every_steps": 0,
        "eval.test_splits": "()",
        **fields,
    }
    return ["--config=default", f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in fields.items()]


TINY_MAIN = [sys.executable, str(REPO / "tests" / "tiny_main.py")]  # the command with the stand-in model


def start_main(args):
    """`python -m p3m_jax.main ARGS` (with the stand-in model) on the CPU in the background, stdout and
    stderr together."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [*TINY_MAIN, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_main(args, env_extra=None, **kwargs):
    """`python -m p3m_jax.main ARGS` with the stand-in model."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    return subprocess.run(
        [*TINY_MAIN, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )
