"""ResNet-34 itself (not the stand-in of train_helpers.py) under gradient accumulation and remat, at 64x64:
remat and smaller micro-batches lower what the forward pass keeps for the backward pass, and a step over
two rematerialised micro-batches gives the full batch's loss and gradients. (Each policy against "none"
at one batch size: test_train_step.py; accumulation's bookkeeping on the stand-in: test_train_accumulation.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from p3m_jax.models import build_model
from p3m_jax.train import create_sharded_train_state, create_train_state, make_mesh, make_train_step
from p3m_jax.train.memory_plan import backward_residual_bytes
from p3m_jax.train.mesh import batch_sharding
from p3m_jax.weights.initialize import init_key
from train_helpers import flat, make_batch

pytestmark = pytest.mark.slow  # the real ResNet-34's train step under remat and accumulation

SIZE = 64


def test_remat_and_micro_batches_lower_what_resnet34_keeps_for_the_backward_pass():
    """Traced, not compiled: a micro-batch of 2 keeps less than the batch of 4 it is half of, remat
    ("full") keeps less at either size, and of what each sample adds it keeps less than half."""
    kept = {}
    for remat in ("none", "full"):
        model = build_model("resnet34", remat=remat)
        state = jax.eval_shape(lambda r: create_train_state(model, optax.sgd(1.0), r, SIZE), jax.random.key(0))
        for size in (2, 4):
            batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in make_batch(size, SIZE).items()}
            kept[remat, size] = backward_residual_bytes(model, state, batch)
    assert kept["none", 4] > kept["none", 2] > kept["full", 2], kept
    assert kept["none", 4] > kept["full", 4] > kept["full", 2], kept
    per_sample = {remat: (kept[remat, 4] - kept[remat, 2]) / 2 for remat in ("none", "full")}
    assert 0 < per_sample["full"] < 0.5 * per_sample["none"], per_sample


def test_two_rematerialised_micro_batches_give_resnet34_the_full_batch_step():
    """One SGD step (learning rate 1: the update is minus the gradient) on a batch of 4, whole without
    remat, and as 2 micro-batches with remat "full". BatchNorm normalises each micro-batch by its own
    statistics, so the images are (a, b, b, a): micro-batch j holds rows j and j + 2, images (a, b) and
    (b, a), whose statistics are the whole batch's, so every row's outputs are the same either way.
    The targets (alpha, trimap, fg/bg) differ in every row, so each micro-batch adds its own share; the
    micro-batches hold 2 and 1 samples with fg/bg, so the composition term's batch-wide normaliser counts."""
    images = make_batch(2, SIZE, seed=5)["image"][[0, 1, 1, 0]]
    batch = {**make_batch(4, SIZE, seed=6, has_fg_bg=[1, 0, 1, 1]), "image": images}
    mesh = make_mesh()
    tx = optax.sgd(1.0)
    state, shardings = create_sharded_train_state(build_model("resnet34"), tx, init_key(0), SIZE, mesh)
    initial = flat(state.params)
    results = {}
    for remat, steps in (("none", 1), ("full", 2)):
        step = make_train_step(
            build_model("resnet34", remat=remat),
            tx,
            mesh,
            shardings,
            optax.constant_schedule(1.0),
            grad_accum_steps=steps,
        )
        # The step donates its state: each run gets a copy of the initial one.
        new_state, metrics = step(jax.tree_util.tree_map(jnp.copy, state), jax.device_put(batch, batch_sharding(mesh)))
        grads = {k: initial[k] - v for k, v in flat(new_state.params).items()}
        results[steps] = ({k: float(v) for k, v in metrics.items()}, grads)
    (full, full_grads), (accumulated, accumulated_grads) = results[1], results[2]
    # The same loss, computed in pieces: equal to rounding (~1e-7 relative here); the tolerance is that of
    # test_train_step.py's remat test, where a flip of the fusion's argmax may add ~1e-4.
    for key in ("loss", "global", "local", "fusion", "composition"):
        np.testing.assert_allclose(accumulated[key], full[key], rtol=1e-3, err_msg=key)
    np.testing.assert_allclose(accumulated["grad_norm"], full["grad_norm"], rtol=1e-2)
    # Relative L2 errors per tensor, as test_train_step.py's remat test compares gradients, for the same
    # reasons: reordered float sums through ill-conditioned deep BatchNorms (conv biases before a BatchNorm
    # have a zero true gradient, pure rounding noise, hence the floor of 1e-3 x the global norm). Measured on an
    # AVX-512 CPU: 1.4e-2 per tensor at most, 1.0e-2 in total; AVX2 kernels spread rounding further (see
    # that test). Leaving out or doubling a micro-batch's gradient is an error of 0.3 or more.
    norm_all = np.sqrt(sum(np.sum(g**2) for g in full_grads.values()))
    total = np.sqrt(sum(np.sum((accumulated_grads[k] - g) ** 2) for k, g in full_grads.items())) / norm_all
    assert total < 5e-2, total
    for key, g in full_grads.items():
        error = np.linalg.norm(accumulated_grads[key] - g) / (np.linalg.norm(g) + 1e-3 * norm_all)
        assert error < 1e-1, (key, error)
