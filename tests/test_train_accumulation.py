"""Gradient accumulation and the parameter EMA of the train step, on the small stand-in model
(`TinyP3M`). The 8-device check of accumulation runs in test_train_step.py's multi-device worker."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p3m_jax.train import make_mesh, prepare_batch
from p3m_jax.train.losses import loss_normalizers, p3m_loss
from p3m_jax.train.step import FCPOptions, micro_batches

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from train_helpers import TinyP3M, flat, make_batch, run_tiny_training  # noqa: E402

# Samples without fg/bg exercise the composition term's batch-wide normaliser.
HAS_FG_BG = [1, 0, 1, 1, 0, 1, 1, 1]


def _fcp_batch(batch, seed=0):
    """P3M-CP's FCP keys for ``batch``: a random source face and mask, applied to half the samples."""
    rng = np.random.default_rng(seed)
    n, size = batch["image"].shape[:2]
    mask = np.zeros((n, size, size, 1), np.uint8)
    mask[:, 8:24, 8:24] = 255
    return {
        **batch,
        "fcp_source": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "fcp_mask": mask,
        "fcp_apply": np.arange(n) % 2 == 0,
    }


def _compare_runs(full, accumulated, rtol=1e-5, atol=1e-6):
    (state_a, metrics_a), (state_b, metrics_b) = full, accumulated
    for a, b in zip(metrics_a, metrics_b):
        for key in ("loss", "global", "local", "fusion", "composition", "grad_norm"):
            np.testing.assert_allclose(b[key], a[key], rtol=rtol, atol=atol, err_msg=key)
    pa, pb = flat(state_a.params), flat(state_b.params)
    for key in pa:
        np.testing.assert_allclose(pb[key], pa[key], rtol=rtol, atol=atol, err_msg=key)


@pytest.mark.parametrize("with_fcp", [False, True], ids=["plain", "fcp"])
def test_four_micro_batches_equal_the_full_batch_step(with_fcp):
    """Without BatchNorm (nothing couples the samples) and without stochastic depth, 4 micro-batches
    give the full batch's loss, loss parts, gradient norm and updates over two SGD steps, with the
    composition term normalised over the whole batch and with P3M-CP's FCP on."""
    batch = make_batch(8, 32, seed=7, has_fg_bg=HAS_FG_BG)
    fcp = None
    if with_fcp:
        batch, fcp = _fcp_batch(batch), FCPOptions(start_step=0, layers=("deep",))
    options = dict(steps=2, batch_norm=False, drop_path=0.0, fcp=fcp)
    full = run_tiny_training(make_mesh(), batch, **options)
    accumulated = run_tiny_training(make_mesh(), batch, grad_accum_steps=4, **options)
    assert int(accumulated[0].step) == 2  # one update per step
    _compare_runs(full, accumulated)


def test_accumulation_uses_micro_batch_batchnorm_statistics():
    """With BatchNorm each micro-batch is normalised by its own statistics and the running
    statistics are updated once per micro-batch, in order: the step equals running the model on
    micro-batch 0 (rows 0, 2, 4, 6) and then on micro-batch 1 (rows 1, 3, 5, 7), each loss being its
    share of the whole batch's (`loss_normalizers`)."""
    batch = make_batch(8, 32, seed=8, has_fg_bg=HAS_FG_BG)
    model = TinyP3M(drop_path=0.0)
    initial, _ = run_tiny_training(make_mesh(), batch, steps=0, drop_path=0.0)
    state, metrics = run_tiny_training(make_mesh(), batch, steps=1, grad_accum_steps=2, drop_path=0.0)

    micro = micro_batches({k: jnp.asarray(v) for k, v in batch.items()}, 2)
    np.testing.assert_array_equal(micro["image"][1], batch["image"][1::2])
    normalizers = loss_normalizers(prepare_batch(batch))
    batch_stats, loss = initial.batch_stats, 0.0
    for j in range(2):
        fb = prepare_batch({k: v[j] for k, v in micro.items()})
        outputs, updates = model.apply(
            {"params": initial.params, "batch_stats": batch_stats}, fb["image"], train=True, mutable=["batch_stats"]
        )
        batch_stats = updates["batch_stats"]
        loss += float(p3m_loss(outputs, fb, normalizers)[0])
    np.testing.assert_allclose(float(metrics[0]["loss"]), loss, rtol=1e-5)
    expected, got = flat(batch_stats), flat(state.batch_stats)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # ... which differs from the full batch's statistics (one update with all 8 samples).
    full_state, _ = run_tiny_training(make_mesh(), batch, steps=1, drop_path=0.0)
    assert not np.allclose(
        flat(full_state.batch_stats)["['encoder']['bn0']['mean']"], got["['encoder']['bn0']['mean']"]
    )


def test_accumulation_needs_a_divisible_batch():
    with pytest.raises(ValueError, match="grad_accum_steps"):
        run_tiny_training(make_mesh(), make_batch(6, 32), steps=1, grad_accum_steps=4)


def test_ema_with_decay_one_half_over_two_steps():
    """EMA_2 = 0.5 EMA_1 + 0.5 p_2 = 0.25 p_0 + 0.25 p_1 + 0.5 p_2, for the parameters and the
    BatchNorm running statistics alike; the raw parameters are those of a run without EMA."""
    batch = make_batch(4, 32, seed=9)
    runs = [run_tiny_training(make_mesh(), batch, steps=n, ema_decay=0.5)[0] for n in (0, 1, 2)]
    for field, ema_field in (("params", "ema_params"), ("batch_stats", "ema_batch_stats")):
        p0, p1, p2 = (flat(getattr(state, field)) for state in runs)
        ema = flat(getattr(runs[2], ema_field))
        assert set(ema) == set(p2)
        for key in p2:
            np.testing.assert_allclose(ema[key], 0.25 * p0[key] + 0.25 * p1[key] + 0.5 * p2[key], rtol=1e-6, atol=1e-7)
    plain, _ = run_tiny_training(make_mesh(), batch, steps=2)
    assert plain.ema_params == {} and plain.ema_batch_stats == {}
    for key, value in flat(plain.params).items():
        np.testing.assert_array_equal(flat(runs[2].params)[key], value)
    variables = runs[2].ema_variables()
    assert variables["params"] is runs[2].ema_params and variables["batch_stats"] is runs[2].ema_batch_stats
    with pytest.raises(ValueError, match="ema_decay"):
        plain.ema_variables()


def test_ema_is_sharded_like_the_parameters():
    from p3m_jax.train import state_shardings
    from p3m_jax.train.state import create_train_state
    import optax

    abstract = jax.eval_shape(
        lambda r: create_train_state(TinyP3M(), optax.sgd(0.1), r, 32, ema=True), jax.random.key(0)
    )
    shardings = state_shardings(abstract, make_mesh(), "fsdp")
    assert jax.tree_util.tree_structure(shardings.ema_params) == jax.tree_util.tree_structure(shardings.params)
    assert jax.tree_util.tree_leaves(shardings.ema_params) == jax.tree_util.tree_leaves(shardings.params)
