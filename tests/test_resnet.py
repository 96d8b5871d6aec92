"""The assembled ResNet-34 P3M-Net: size, outputs, modes, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import p3m_jax
from p3m_jax.models import build_model
from p3m_jax.models.decoder import fuse_global_local


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_parameter_count_matches_the_authors_model(resnet34_variables):
    # PyTorch parameters() of the authors' model, BN running statistics excluded.
    assert count(resnet34_variables["params"]) == 39_478_060
    assert set(resnet34_variables) == {"params", "batch_stats"}


INPUT = jax.random.normal(jax.random.key(1), (2, 128, 96, 3))


@pytest.fixture(scope="module")
def jitted_outputs(resnet34_variables):
    """Eval-mode outputs on INPUT (and its 64x64 crop), one compilation per (size, dtype)."""
    cache = {}

    def get(size, dtype):
        if (size, dtype) not in cache:
            model = build_model("resnet34", dtype=dtype)
            x = INPUT[:, : size[0], : size[1]]
            cache[size, dtype] = jax.jit(lambda v, x: model.apply(v, x, train=False))(resnet34_variables, x)
        return cache[size, dtype]

    return get


@pytest.mark.parametrize("size,dtype", [((64, 64), jnp.float32), ((128, 96), jnp.float32), ((128, 96), jnp.bfloat16)])
def test_forward_under_jit_gives_six_outputs(jitted_outputs, size, dtype):
    out = jitted_outputs(size, dtype)
    assert set(out) == set(p3m_jax.OUTPUT_NAMES)
    for name in ("global", "side2", "side1", "side0"):
        assert out[name].shape == (2, *size, 3) and out[name].dtype == jnp.float32
    for name in ("local", "fusion"):
        assert out[name].shape == (2, *size, 1)
    for name, value in out.items():
        assert np.isfinite(np.asarray(value)).all(), name
    local = np.asarray(out["local"])
    assert (local >= 0).all() and (local <= 1).all()
    np.testing.assert_array_equal(np.asarray(out["fusion"]), np.asarray(fuse_global_local(out["global"], out["local"])))


def test_bfloat16_compute_stays_close_to_float32(jitted_outputs):
    ref = jitted_outputs((128, 96), jnp.float32)
    low = jitted_outputs((128, 96), jnp.bfloat16)
    # Parameters stay float32; only the compute is bfloat16 (about 3 significant digits).
    err = np.abs(np.asarray(low["local"]) - np.asarray(ref["local"])).mean()
    assert err < 0.02


def test_train_mode_updates_batch_statistics(resnet34_variables, jitted_outputs):
    model = build_model("resnet34")
    x = INPUT[:, :64, :64]
    out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(resnet34_variables, x)
    old = resnet34_variables["batch_stats"]["encoder"]["bn1"]
    new = updates["batch_stats"]["encoder"]["bn1"]
    assert not np.allclose(np.asarray(old["mean"]), np.asarray(new["mean"]))
    assert jax.tree_util.tree_structure(updates["batch_stats"]) == jax.tree_util.tree_structure(
        resnet34_variables["batch_stats"]
    )
    # Train mode normalizes with the batch statistics, so the output differs from eval mode.
    eval_out = jitted_outputs((64, 64), jnp.float32)
    assert not np.allclose(np.asarray(out["global"]), np.asarray(eval_out["global"]))


def test_fusion_follows_the_global_decision():
    logits = jnp.array([[[[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]]]])  # bg, transition, fg
    local = jnp.array([[[[0.3], [0.4], [0.6]]]])
    np.testing.assert_allclose(np.asarray(fuse_global_local(logits, local))[0, 0, :, 0], [0.0, 0.4, 1.0])
    # No gradient reaches the global logits through the argmax.
    grad = jax.grad(lambda g: fuse_global_local(g, local).sum())(logits)
    assert not np.asarray(grad).any()


@pytest.mark.parametrize("shape", [(1, 64, 48, 3), (1, 64, 64, 1), (64, 64, 3), (1, 0, 32, 3)])
def test_bad_input_shapes_fail_clearly(resnet34_variables, shape):
    with pytest.raises(ValueError, match="multiples of 32|NHWC"):
        build_model("resnet34").apply(resnet34_variables, jnp.zeros(shape))


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("resnet50")
