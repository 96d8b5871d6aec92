"""Shared pytest setup: tests run on the CPU; 8 virtual devices are made only in subprocesses."""

import os

# Keep JAX on the CPU even where an accelerator is visible, and quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

# The files that take longest (they compile the real networks), longest first, as measured with
# `--junitxml`. `-n 2 --dist loadfile` hands whole files to the two workers in collection order
# (pyproject.toml turns off xdist's reordering by test count); starting with the long ones keeps one
# worker from being left with a long file at the end while the other waits.
SLOW_FILES_FIRST = (
    "test_tpu_plan.py",
    "test_real_network_memory.py",
    "test_train_step.py",
    "test_export.py",
    "test_train_gradients.py",
    "test_inference.py",
    "test_layers.py",
    "test_train_loop.py",
    "test_gcs.py",
    "test_serve.py",
    "test_install.py",
    "test_docs_commands.py",  # after test_install.py, whose quickstart fills the compilation cache it reuses
    "test_copy_paste.py",
    "test_metrics.py",
    "test_evaluate.py",
    "test_predict.py",
    "test_swin.py",
    "test_vitae.py",
    "test_train_accumulation.py",
    "test_resnet.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for this test run only (it starts empty).

    Several tests compile the same program (a training step, a network at one input size), in
    this process, in subprocesses (which read JAX_COMPILATION_CACHE_DIR) and in the other xdist
    workers (the cache folder is shared by the run's workers); they share one compile.
    """
    import jax

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's own
    cache_dir = os.path.join(base, "xla_cache")
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    previous = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    yield cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    if previous is None:
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def keep_the_session_cache(compilation_cache):
    """Commands run in-process may switch JAX's cache folder (their --cache_dir): the next test gets the
    session's back, so no test depends on the order of the ones before it."""
    yield
    import jax

    if jax.config.jax_compilation_cache_dir != compilation_cache:
        from p3m_jax.common.compilation_cache import enable_compilation_cache

        enable_compilation_cache(compilation_cache)


@pytest.fixture(scope="session")
def resnet34_variables():
    """Randomly initialized ResNet-34 P3M-Net variables (initialized once per session)."""
    import jax

    from p3m_jax.models import build_model, init_variables
    from p3m_jax.weights.initialize import init_key

    model = build_model("resnet34")
    return jax.jit(lambda rng: init_variables(model, rng))(init_key(0))


@pytest.fixture(scope="module")
def tiny_model():
    """The loop's tests run the small stand-in model (tests/train_helpers.py): they are about the loop;
    the real networks train in tests/test_train_step.py, test_train_gradients.py and test_install.py."""
    from train_helpers import use_tiny_model

    with pytest.MonkeyPatch.context() as patch:
        use_tiny_model(patch)
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A TFDS folder of the module; the synthetic dataset is built into it on first use."""
    return str(tmp_path_factory.mktemp("tfds"))
