"""Shared pytest setup: tests run on the CPU; 8 virtual devices are made only in subprocesses."""

import os

# Keep JAX on the CPU even where an accelerator is visible, and quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for this test session only (it starts empty).

    Several tests compile the same training step (same model, shapes and optimizer), in this
    process and in subprocesses (which read JAX_COMPILATION_CACHE_DIR); they share one compile.
    """
    import jax

    cache_dir = str(tmp_path_factory.mktemp("xla_cache"))
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    previous = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    yield cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    if previous is None:
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def resnet34_variables():
    """Randomly initialized ResNet-34 P3M-Net variables (initialized once per session)."""
    import jax

    from p3m_jax.models import build_model, init_variables
    from p3m_jax.weights.initialize import init_key

    model = build_model("resnet34")
    return jax.jit(lambda rng: init_variables(model, rng))(init_key(0))
