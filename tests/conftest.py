"""Shared pytest setup: tests run on the CPU; 8 virtual devices are made only in subprocesses."""

import os

# Keep JAX on the CPU even where an accelerator is visible, and quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest


@pytest.fixture(scope="session")
def resnet34_variables():
    """Randomly initialized ResNet-34 P3M-Net variables (initialized once per session)."""
    import jax

    from p3m_jax.models import build_model, init_variables
    from p3m_jax.predictor import init_key

    model = build_model("resnet34")
    return jax.jit(lambda rng: init_variables(model, rng))(init_key(0))
