"""Training core: optimizer/state, step functions, sharding equivalence (8 virtual devices and
two processes vs one, with and without gradient accumulation), bfloat16, remat, and overfitting one
fixed batch with ResNet-34.

Multi-device runs happen in subprocesses (the main test process keeps 1 CPU device); they use
`TinyP3M` (tests/train_helpers.py), a stand-in with P3M-Net's output contract built from the
real layers, because compiling a real variant's step takes minutes on a small CPU.
"""

import dataclasses
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p3m_jax.common.errors import ConfigError
from p3m_jax.configs import p3m10k
from p3m_jax.models import REMAT_POLICIES, build_model, init_variables
from p3m_jax.weights.initialize import init_key
from p3m_jax.train import (
    create_sharded_train_state,
    create_train_state,
    make_mesh,
    OptimizerOptions,
    make_optimizer,
    make_train_step,
    prepare_batch,
    state_shardings,
)
from p3m_jax.train.memory_plan import backward_residual_bytes
from p3m_jax.train.state import fsdp_spec
from p3m_jax.train.step import eval_step

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from train_helpers import TinyP3M, flat, make_batch, run_tiny_training  # noqa: E402
from tests.hlo_helpers import ynnpack_convolutions  # noqa: E402

TESTS = pathlib.Path(__file__).parent
REPO = TESTS.parent


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    return env


# ---------------------------------------------------------------- cheap unit checks


def test_prepare_batch_converts_the_host_contract():
    b = make_batch(2, 32, has_fg_bg=[True, False])
    fb = jax.jit(prepare_batch)({**b, "fcp_apply": np.zeros(2, bool)})
    assert set(fb) == {"image", "fg", "bg", "alpha", "trimap", "has_fg_bg"}
    assert all(v.dtype == jnp.float32 for v in fb.values())
    std = np.array([0.229, 0.224, 0.225])
    mean = np.array([0.485, 0.456, 0.406])
    np.testing.assert_allclose(np.asarray(fb["image"]), (b["image"] / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fb["alpha"]), b["alpha"] / 255.0, atol=1e-7)
    assert set(np.unique(np.asarray(fb["trimap"]))) <= {0.0, 128.0, 255.0}
    np.testing.assert_array_equal(np.asarray(fb["has_fg_bg"]), [1.0, 0.0])
    no_fg = prepare_batch({k: b[k] for k in ("image", "alpha", "trimap")})
    np.testing.assert_array_equal(np.asarray(no_fg["has_fg_bg"]), [0.0, 0.0])


def paper_optimizer(**overrides) -> OptimizerOptions:
    """The paper's optimizer (the p3m10k recipe: Adam, constant 1e-5) with some fields changed."""
    return dataclasses.replace(OptimizerOptions.from_config(p3m10k.get_config().optimizer), **overrides)


def test_make_optimizer_schedules_and_options():
    tx, lr = make_optimizer(paper_optimizer(), 100)
    assert float(lr(0)) == pytest.approx(1e-5) and float(lr(99)) == pytest.approx(1e-5)
    cfg = paper_optimizer(
        name="adamw",
        learning_rate=1e-3,
        schedule="warmup_cosine",
        warmup_steps=10,
        end_learning_rate_factor=0.1,
        weight_decay=0.01,
        grad_clip_norm=1.0,
    )
    tx, lr = make_optimizer(cfg, 110)
    assert float(lr(0)) == 0.0
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(110)) == pytest.approx(1e-4)
    # clipping: a huge gradient gives the same first update as a unit-norm one
    params = {"w": jnp.ones(4)}
    big = tx.update({"w": jnp.full(4, 1e6)}, tx.init(params), params)[0]
    unit = tx.update({"w": jnp.full(4, 0.5)}, tx.init(params), params)[0]
    np.testing.assert_allclose(np.asarray(big["w"]), np.asarray(unit["w"]), rtol=1e-5)
    for field, value in (("name", "sgd"), ("schedule", "linear"), ("learning_rate", -1.0), ("b2", 1.0)):
        with pytest.raises(ConfigError, match=rf"^config\.optimizer\.{field}: "):
            paper_optimizer(**{field: value})
    with pytest.raises(TypeError, match="OptimizerOptions.from_config"):
        make_optimizer({"learning_rate": 1e-3}, 10)


def test_fsdp_spec_and_state_shardings():
    assert tuple(fsdp_spec((3, 3, 64, 128), 8)) == (None, None, None, "data")
    assert tuple(fsdp_spec((7,), 8)) == ()
    assert tuple(fsdp_spec((), 8)) == ()
    model = TinyP3M()
    tx, _ = make_optimizer(paper_optimizer(), 1)
    abstract = jax.eval_shape(lambda r: create_train_state(model, tx, r, 32), jax.random.key(0))
    sh = state_shardings(abstract, make_mesh(), "fsdp")
    assert jax.tree_util.tree_structure(sh, is_leaf=lambda x: hasattr(x, "spec")) == jax.tree_util.tree_structure(
        abstract
    )
    with pytest.raises(ValueError):
        state_shardings(abstract, make_mesh(), "zero3")


# ---------------------------------------------------------------- sharding equivalence


def _compare(ref: dict, got: dict, rtol=1e-4, atol=1e-5):
    keys = [k for k in ref if not k.startswith("num_")]
    assert keys and set(keys) <= set(got)
    for k in keys:
        np.testing.assert_allclose(got[k], ref[k], rtol=rtol, atol=atol, err_msg=k)


def test_eight_devices_match_one_device_replicated_and_fsdp(tmp_path):
    """Same global batch: 1 device vs 8 virtual devices (parameters replicated, then
    FSDP-sharded). Parameters after 2 SGD steps, BatchNorm running statistics (global-batch
    statistics), stochastic-depth masks and every metric agree."""
    subprocess.run(
        [sys.executable, str(TESTS / "multidevice_train_worker.py"), str(tmp_path)], check=True, env=_env(), timeout=600
    )
    one = dict(np.load(tmp_path / "one.npz"))
    for name in ("replicated", "fsdp"):
        got = dict(np.load(tmp_path / f"{name}.npz"))
        _compare(one, got)
        assert any(k.startswith("batch_stats") for k in got)
    assert int(np.load(tmp_path / "replicated.npz")["num_sharded_params"]) == 0
    assert int(np.load(tmp_path / "fsdp.npz")["num_sharded_params"]) > 0
    # Gradient accumulation (2 micro-batches) on 8 devices with FSDP equals it on one device.
    _compare(dict(np.load(tmp_path / "accum_one.npz")), dict(np.load(tmp_path / "accum_fsdp.npz")))
    # the step did something
    assert not np.allclose(one["metric_0_loss"], one["metric_1_loss"])


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    """Two local jax.distributed processes (gloo, 2 CPU devices each, FSDP parameters), each
    feeding its half of the global batch, train 3 steps like one process on the whole batch."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(TESTS / "multiprocess_train_worker.py"),
                str(port),
                str(i),
                str(tmp_path / f"p{i}.npz"),
            ],
            env=_env(),
        )
        for i in range(2)
    ]
    # the single-process reference, meanwhile, in this process (1 device)
    state, metrics = run_tiny_training(make_mesh(), make_batch(8, 32, seed=2), steps=3)
    ref = {f"params{k}": v for k, v in flat(state.params).items()}
    ref.update({f"batch_stats{k}": v for k, v in flat(state.batch_stats).items()})
    ref.update({f"metric_{i}_{k}": v for i, m in enumerate(metrics) for k, v in m.items()})
    for p in procs:
        assert p.wait(timeout=600) == 0
    for i in range(2):
        result = dict(np.load(tmp_path / f"p{i}.npz"))
        # One run per workdir: only process 0 holds the lock; a second run is refused on both.
        assert bool(result.pop("lock_held_here")) == (i == 0)
        assert bool(result.pop("second_run_refused"))
        _compare(ref, result)


# ---------------------------------------------------------------- dtype


def test_bfloat16_step_keeps_float32_state_and_a_close_loss():
    batch = make_batch(4, 32, seed=3)
    mesh = make_mesh()
    s32, m32 = run_tiny_training(mesh, batch, steps=3, dtype=jnp.float32)
    s16, m16 = run_tiny_training(mesh, batch, steps=3, dtype=jnp.bfloat16)
    for leaf in jax.tree_util.tree_leaves((s16.params, s16.opt_state, s16.batch_stats)):
        assert leaf.dtype in (jnp.float32, jnp.int32)
    for a, b in zip(m32, m16):
        assert b["loss"].dtype == np.float32
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=3e-2)
        np.testing.assert_allclose(b["local"], a["local"], rtol=5e-2)


# ---------------------------------------------------------------- real variants


def test_remat_keeps_the_parameter_tree():
    for arch in ("resnet34", "swin_t", "vitae_s"):
        shapes = [
            jax.eval_shape(lambda r: init_variables(build_model(arch, remat=remat), r), jax.random.key(0))
            for remat in REMAT_POLICIES
        ]
        for other in shapes[1:]:
            assert jax.tree_util.tree_structure(shapes[0]) == jax.tree_util.tree_structure(other)
            assert jax.tree_util.tree_all(
                jax.tree_util.tree_map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, shapes[0], other)
            )


def test_remat_policies_keep_less_for_the_backward_pass():
    """What the forward pass keeps for the backward pass (traced, not compiled): each policy keeps less
    than none, and full (encoder stages and decoder blocks) less than either alone."""
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in make_batch(2, SIZE).items()}
    kept = {}
    for remat in REMAT_POLICIES:
        model = build_model("resnet34", remat=remat)
        tx, _ = make_optimizer(paper_optimizer(), 1)
        state = jax.eval_shape(lambda r: create_train_state(model, tx, r, SIZE), jax.random.key(0))
        kept[remat] = backward_residual_bytes(model, state, batch)
    assert kept["none"] > kept["encoder"] > kept["full"], kept
    assert kept["none"] > kept["decoder"] > kept["full"], kept


OVERFIT_STEPS = 15
SIZE = 64


@pytest.fixture(scope="module")
def overfit_run():
    """ResNet-34's compiled train step, reused: overfits one fixed 64x64 batch of 2. (Swin-T and
    ViTAE-S overfit in test_train_gradients.py with the train-mode step compiled there.)"""
    arch = "resnet34"
    model = build_model(arch)
    tx, lr = make_optimizer(paper_optimizer(learning_rate=1e-3), OVERFIT_STEPS)
    mesh = make_mesh()
    # init_key: the training loop's key (rbg), whose initializers compile 2-3x faster than threefry's
    state, shardings = create_sharded_train_state(model, tx, init_key(0), SIZE, mesh)
    initial = jax.tree_util.tree_map(jnp.copy, state)
    step = make_train_step(model, tx, mesh, shardings, lr)
    batch = jax.device_put(make_batch(2, SIZE, seed=4), jax.devices()[0])
    losses, first_state = [], None
    for i in range(OVERFIT_STEPS):
        state, m = step(state, batch)
        if i == 0:
            first_state = jax.tree_util.tree_map(jnp.copy, state)
        losses.append(float(m["loss"]))
    return dict(
        arch=arch,
        model=model,
        tx=tx,
        lr=lr,
        mesh=mesh,
        shardings=shardings,
        step=step,
        initial=initial,
        first=first_state,
        batch=batch,
        losses=losses,
        state=state,
    )


def test_loss_falls_when_overfitting_one_batch(overfit_run):
    losses = overfit_run["losses"]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses
    assert int(overfit_run["state"].step) == OVERFIT_STEPS
    # eval mode (running statistics) runs on the trained state and gives a finite loss
    metrics, outputs = jax.jit(lambda s, b: eval_step(s, b, model=overfit_run["model"]))(
        overfit_run["state"], overfit_run["batch"]
    )
    assert np.isfinite(float(metrics["loss"]))
    assert outputs["fusion"].shape == (2, SIZE, SIZE, 1)


def test_cpu_train_step_compiles_convolutions_without_ynnpack(overfit_run):
    # `make_train_step` compiles with `compile_options`: on the CPU, XLA's own convolutions (faster
    # there than YNNPACK's); the overfitting run above trained with them. The step's program is
    # the one already compiled (JAX's in-memory cache), so this check compiles nothing.
    compiled = overfit_run["step"].lower(overfit_run["initial"], overfit_run["batch"]).compile()
    assert " convolution(" in compiled.as_text() and ynnpack_convolutions(compiled) == 0


def test_remat_gives_the_same_gradients(overfit_run):
    """First step with the encoder stages and the decoder blocks rematerialised (policy "full"): Adam's
    first moment after one step is 0.1 * gradient, so comparing it compares the gradients."""
    model = build_model(overfit_run["arch"], remat="full")
    step = make_train_step(model, overfit_run["tx"], overfit_run["mesh"], overfit_run["shardings"], overfit_run["lr"])
    state, metrics = step(overfit_run["initial"], overfit_run["batch"])
    ref = overfit_run["first"]
    # The same forward pass, compiled differently: the loss agrees to rounding, which the deep
    # BatchNorms (8 values per channel here) and the global branch's argmax in the fusion
    # amplify to ~1e-4 relative at most.
    np.testing.assert_allclose(float(metrics["loss"]), overfit_run["losses"][0], rtol=1e-3)
    mu_ref = flat(ref.opt_state[0].mu)
    mu = flat(state.opt_state[0].mu)
    # Recomputation reorders float sums, and a few deep BatchNorms see only 8 values per
    # channel at this size (ill-conditioned), so compare relative L2 errors per tensor. Conv
    # biases right before a BatchNorm have a zero true gradient (pure rounding noise): the
    # floor of 1e-3 x the global norm keeps them from dominating. How far rounding spreads
    # depends on the CPU's kernels: ~4e-3 in total on AVX-512 machines, up to 1.7e-2 per
    # tensor (cosine 0.99986) on an AVX2-only one. A missing or wrong gradient is O(1).
    norm_all = np.sqrt(sum(np.sum(v**2) for v in mu_ref.values()))
    for k, v in mu_ref.items():
        err = np.linalg.norm(mu[k] - v) / (np.linalg.norm(v) + 1e-3 * norm_all)
        assert err < 5e-2, (k, err)
    total = np.sqrt(sum(np.sum((mu[k] - v) ** 2) for k, v in mu_ref.items())) / norm_all
    assert total < 3e-2, total
    _compare(flat(ref.batch_stats), flat(state.batch_stats))
