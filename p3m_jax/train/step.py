"""Pure, jittable training and evaluation steps, and their sharded ``jit`` wrappers.

The host hands over the uint8 batch of the data pipeline (image, alpha, trimap, fg, bg,
has_fg_bg, ...); `prepare_batch` turns it into the float batch of `p3m_jax.train.losses.p3m_loss`
inside the compiled step. Under `make_train_step` the batch is sharded on the mesh's ``data``
axis and the state is replicated or FSDP-sharded (see `state.state_shardings`); BatchNorm's
batch mean/variance are then reductions over a sharded axis, i.e. global-batch statistics
(XLA inserts the all-reduce). Nothing in a step synchronises with the host.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from p3m_jax.common.compile_options import compiler_options
from p3m_jax.common.errors import ConfigError, check
from p3m_jax.models.copy_paste import check_layers, fcp_inputs
from p3m_jax.ops.normalize import normalize_uint8
from p3m_jax.train.losses import p3m_loss
from p3m_jax.train.mesh import batch_sharding, replicated
from p3m_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class FCPOptions:
    """P3M-CP's feature-level copy and paste in the train step: from ``start_step`` on, the batch's
    ``fcp_*`` keys (`p3m_jax.data.copy_paste`) replace the features of ``layers`` inside the model."""

    start_step: int
    layers: tuple[str, ...]

    def __post_init__(self):
        check(self.start_step >= 0, "copy_paste.fcp.start_step", f"must be >= 0, got {self.start_step}")
        try:
            object.__setattr__(self, "layers", check_layers(self.layers))
        except ValueError as e:
            raise ConfigError(f"config.copy_paste.fcp.layers: {e}") from None

    @classmethod
    def from_config(cls, fcp_config) -> "FCPOptions | None":
        """From ``config.copy_paste.fcp`` (checked also when off); None when it is off."""
        options = cls(int(fcp_config.start_step), tuple(fcp_config.layers))
        return options if fcp_config.enabled else None


def _model_kwargs(batch: Batch, state: TrainState, fcp: FCPOptions | None) -> dict:
    """Extra keyword arguments of ``model.apply``: P3M-CP's ``fcp`` inputs when FCP is on."""
    if fcp is None:
        return {}
    return {"fcp": fcp_inputs(batch, state.step, fcp.start_step, fcp.layers)}


METRIC_NAMES = ("loss", "global", "local", "fusion", "composition", "learning_rate", "grad_norm")


def prepare_batch(batch: Batch) -> dict[str, jax.Array]:
    """uint8 host batch -> the float batch of the loss (jittable).

    ``image``/``fg``/``bg`` (N, H, W, 3) uint8 -> ImageNet-normalised float32; ``alpha``
    (N, H, W, 1) uint8 -> float32 in [0, 1]; ``trimap`` -> float32 0/128/255; ``has_fg_bg``
    (N,) -> float32 (all ones when absent, zeros-filled fg/bg when those are absent). Float
    inputs are taken as already converted. Other keys are not returned.
    """
    image = batch["image"]
    n = image.shape[0]
    conv = lambda x: normalize_uint8(x) if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    out = {"image": conv(image)}
    alpha = batch["alpha"]
    out["alpha"] = alpha.astype(jnp.float32) / 255.0 if alpha.dtype == jnp.uint8 else alpha.astype(jnp.float32)
    out["trimap"] = batch["trimap"].astype(jnp.float32)
    if "fg" in batch and "bg" in batch:
        out["fg"], out["bg"] = conv(batch["fg"]), conv(batch["bg"])
        has = batch.get("has_fg_bg")
        out["has_fg_bg"] = jnp.ones((n,), jnp.float32) if has is None else has.astype(jnp.float32).reshape(n)
    else:
        out["fg"] = out["bg"] = jnp.zeros_like(out["image"])
        out["has_fg_bg"] = jnp.zeros((n,), jnp.float32)
    return out


def _as_float32(outputs):
    return {k: v.astype(jnp.float32) for k, v in outputs.items()}


def dropout_key(state: TrainState) -> jax.Array:
    """The step's dropout key (Swin-T stochastic depth): the state's key folded with the step,
    so every step (and every process) draws the same, reproducible key."""
    return jax.random.fold_in(state.rng, state.step)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model,
    optimizer: optax.GradientTransformation,
    lr_schedule: optax.Schedule | None = None,
    fcp: FCPOptions | None = None,
) -> tuple[TrainState, dict]:
    """One optimizer step on ``batch`` (the uint8 host-contract dict; unknown keys ignored).

    Returns the new state and float32 scalar metrics: ``loss``, ``global``, ``local``,
    ``fusion``, ``composition`` (see `p3m_jax.train.losses.p3m_loss`), ``learning_rate`` (of this
    update; NaN without ``lr_schedule``) and ``grad_norm`` (global norm before clipping).
    """
    fb = prepare_batch(batch)
    extra = _model_kwargs(batch, state, fcp)
    rngs = {"dropout": dropout_key(state)}

    def loss_fn(params):
        variables = {**state.variables(), "params": params}
        outputs, updates = model.apply(variables, fb["image"], train=True, mutable=["batch_stats"], rngs=rngs, **extra)
        total, parts = p3m_loss(_as_float32(outputs), fb)
        return total, (parts, updates)

    (loss, (parts, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    param_updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    lr = jnp.asarray(lr_schedule(state.step), jnp.float32) if lr_schedule is not None else jnp.float32(jnp.nan)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=updates.get("batch_stats", state.batch_stats),
        opt_state=opt_state,
    )
    metrics = {"loss": loss, **parts, "learning_rate": lr, "grad_norm": grad_norm}
    return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def eval_step(state: TrainState, batch: Batch, *, model, fcp: FCPOptions | None = None) -> tuple[dict, dict]:
    """Eval-mode forward (running BatchNorm statistics, no stochastic depth) and the loss on a
    training-style batch. Returns ``(metrics, outputs)``: metrics ``loss``, ``global``,
    ``local``, ``fusion``, ``composition`` (float32 scalars) and the model's float32 outputs."""
    fb = prepare_batch(batch)
    extra = _model_kwargs(batch, state, fcp)
    outputs = _as_float32(model.apply(state.variables(), fb["image"], train=False, **extra))
    loss, parts = p3m_loss(outputs, fb)
    return {"loss": loss, **parts}, outputs


def make_train_step(
    model,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    state_sharding,
    lr_schedule: optax.Schedule | None = None,
    fcp: FCPOptions | None = None,
    donate: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`train_step` jitted over ``mesh``: state in/out with ``state_sharding`` (from
    `state_shardings`), batch sharded on ``data``, metrics replicated, the state donated,
    compiled with the options of the mesh's platform (`p3m_jax.common.compile_options`)."""
    fn = functools.partial(train_step, model=model, optimizer=optimizer, lr_schedule=lr_schedule, fcp=fcp)
    return jax.jit(
        fn,
        in_shardings=(state_sharding, batch_sharding(mesh)),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,) if donate else (),
        compiler_options=_mesh_compiler_options(mesh),
    )


def make_eval_step(
    model, mesh: Mesh, state_sharding, fcp: FCPOptions | None = None
) -> Callable[[TrainState, Batch], tuple[dict, dict]]:
    """`eval_step` jitted over ``mesh``: metrics replicated, outputs sharded like the batch."""
    fn = functools.partial(eval_step, model=model, fcp=fcp)
    return jax.jit(
        fn,
        in_shardings=(state_sharding, batch_sharding(mesh)),
        out_shardings=(replicated(mesh), batch_sharding(mesh)),
        compiler_options=_mesh_compiler_options(mesh),
    )


def _mesh_compiler_options(mesh: Mesh) -> dict | None:
    return compiler_options(mesh.devices.flat[0].platform)


__all__ = [
    "prepare_batch",
    "train_step",
    "eval_step",
    "make_train_step",
    "make_eval_step",
    "dropout_key",
    "METRIC_NAMES",
]
