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
from p3m_jax.models.fcp import check_layers, fcp_inputs
from p3m_jax.ops.normalize import normalize_uint8
from p3m_jax.train.losses import loss_normalizers, p3m_loss
from p3m_jax.train.mesh import batch_sharding, replicated
from p3m_jax.train.state import PyTree, TrainState

Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class FCPOptions:
    """P3M-CP's feature-level copy and paste in the train step: from ``start_step`` on, the batch's
    ``fcp_*`` keys (`p3m_jax.data.cp_transforms`) replace the features of ``layers`` inside the model."""

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


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How the train step turns a batch into an update: ``grad_accum_steps`` micro-batches per
    optimizer step (1: the whole batch at once) and the parameter EMA's decay (0: no EMA)."""

    grad_accum_steps: int
    ema_decay: float

    def __post_init__(self):
        check(self.grad_accum_steps >= 1, "grad_accum_steps", f"must be >= 1, got {self.grad_accum_steps}")
        check(0.0 <= self.ema_decay < 1.0, "ema_decay", f"must be in [0, 1) (0 disables), got {self.ema_decay}")

    @classmethod
    def from_config(cls, config) -> "StepOptions":
        return cls(int(config.grad_accum_steps), float(config.ema_decay))


def _model_kwargs(batch: Batch, state: TrainState, fcp: FCPOptions | None) -> dict:
    """Extra keyword arguments of ``model.apply``: P3M-CP's ``fcp`` inputs when FCP is on."""
    if fcp is None:
        return {}
    return {"fcp": fcp_inputs(batch, state.step, fcp.start_step, fcp.layers)}


def prepare_batch(batch: Batch) -> dict[str, jax.Array]:
    """uint8 host batch -> the float batch of the loss (jittable).

    ``image``/``fg``/``bg`` (N, H, W, 3) uint8 -> ImageNet-normalised float32; ``alpha``
    (N, H, W, 1) uint8 -> float32 in [0, 1]; ``trimap`` -> float32 0/128/255; ``has_fg_bg``
    (N,) -> float32 (all ones when absent, zeros-filled fg/bg when those are absent). Float
    inputs are taken as already converted. Other keys are not returned.
    """
    image = batch["image"]
    conv = lambda x: normalize_uint8(x) if x.dtype == jnp.uint8 else x.astype(jnp.float32)
    out = {"image": conv(image)}
    alpha = batch["alpha"]
    out["alpha"] = alpha.astype(jnp.float32) / 255.0 if alpha.dtype == jnp.uint8 else alpha.astype(jnp.float32)
    out["trimap"] = batch["trimap"].astype(jnp.float32)
    if "fg" in batch and "bg" in batch:
        out["fg"], out["bg"] = conv(batch["fg"]), conv(batch["bg"])
    else:
        out["fg"] = out["bg"] = jnp.zeros_like(out["image"])
    out["has_fg_bg"] = _has_fg_bg(batch)
    return out


def _has_fg_bg(batch: Batch) -> jax.Array:
    """(N,) float32: which samples have a foreground/background pair (none when the batch has no fg/bg)."""
    n = batch["image"].shape[0]
    if "fg" not in batch or "bg" not in batch:
        return jnp.zeros((n,), jnp.float32)
    has = batch.get("has_fg_bg")
    return jnp.ones((n,), jnp.float32) if has is None else has.astype(jnp.float32).reshape(n)


def _as_float32(outputs):
    return {k: v.astype(jnp.float32) for k, v in outputs.items()}


def dropout_key(state: TrainState) -> jax.Array:
    """The step's dropout key (Swin-T stochastic depth): the state's key folded with the step,
    so every step (and every process) draws the same, reproducible key."""
    return jax.random.fold_in(state.rng, state.step)


def make_loss_fn(state: TrainState, batch: Batch, *, model, fcp=None, rng=None, normalizers=None) -> Callable:
    """``params -> (loss, (parts, updates))``: the training loss of ``batch`` (train-mode forward) with the
    rest of ``state``; ``updates`` holds the new BatchNorm statistics."""
    fb = prepare_batch(batch)
    extra = _model_kwargs(batch, state, fcp)
    rng = dropout_key(state) if rng is None else rng

    def loss_fn(params):
        variables = {**state.variables(), "params": params}
        outputs, updates = model.apply(
            variables, fb["image"], train=True, mutable=["batch_stats"], rngs={"dropout": rng}, **extra
        )
        total, parts = p3m_loss(_as_float32(outputs), fb, normalizers)
        return total, (parts, updates)

    return loss_fn


def _loss_and_grads(state: TrainState, batch: Batch, *, model, fcp, rng, normalizers=None):
    """Loss, its parts, gradients and updated BatchNorm statistics of one forward/backward pass."""
    loss_fn = make_loss_fn(state, batch, model=model, fcp=fcp, rng=rng, normalizers=normalizers)
    (loss, (parts, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loss, parts, grads, updates.get("batch_stats", state.batch_stats)


def micro_batches(batch: Batch, steps: int) -> dict:
    """Splits every (N, ...) leaf into (steps, N / steps, ...): micro-batch ``j`` holds rows
    j, j + steps, j + 2 steps, ... A device holding a contiguous shard of the batch then holds
    its part of every micro-batch, so the split moves no data between devices."""
    n = batch["image"].shape[0]

    def split(key, x):
        if x.ndim == 0 or x.shape[0] != n:
            raise ValueError(f"batch[{key!r}] has shape {x.shape}; gradient accumulation needs (N, ...) leaves")
        return jnp.swapaxes(x.reshape(n // steps, steps, *x.shape[1:]), 0, 1)

    return {key: split(key, jnp.asarray(x)) for key, x in batch.items()}


def _accumulated_loss_and_grads(state: TrainState, batch: Batch, steps: int, *, model, fcp, rng):
    """`_loss_and_grads` summed over ``steps`` micro-batches in one `lax.scan`. The loss of each is its
    share of the whole batch's (`losses.loss_normalizers`), so the sums equal the whole batch's loss
    and gradients. BatchNorm normalises each micro-batch by its own statistics (as PyTorch would
    with that batch) and updates the running statistics once per micro-batch, in order."""
    n = batch["image"].shape[0]
    check(n % steps == 0, "grad_accum_steps", f"{steps} does not divide the batch of {n}")
    normalizers = loss_normalizers({"trimap": batch["trimap"], "has_fg_bg": _has_fg_bg(batch)})
    zero = jnp.zeros((), jnp.float32)

    def body(carry, xs):
        grads_sum, loss_sum, parts_sum, batch_stats = carry
        index, micro = xs
        loss, parts, grads, batch_stats = _loss_and_grads(
            state.replace(batch_stats=batch_stats),
            micro,
            model=model,
            fcp=fcp,
            rng=jax.random.fold_in(rng, index),
            normalizers=normalizers,
        )
        add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)
        return (add(grads_sum, grads), loss_sum + loss, add(parts_sum, parts), batch_stats), None

    init = (
        jax.tree_util.tree_map(jnp.zeros_like, state.params),
        zero,
        {name: zero for name in ("global", "local", "fusion", "composition")},
        state.batch_stats,
    )
    (grads, loss, parts, batch_stats), _ = jax.lax.scan(body, init, (jnp.arange(steps), micro_batches(batch, steps)))
    return loss, parts, grads, batch_stats


def ema_update(ema: PyTree, new: PyTree, decay: float) -> PyTree:
    """decay * ema + (1 - decay) * new, leaf by leaf."""
    return jax.tree_util.tree_map(lambda e, x: decay * e + (1.0 - decay) * x, ema, new)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model,
    optimizer: optax.GradientTransformation,
    lr_schedule: optax.Schedule | None = None,
    fcp: FCPOptions | None = None,
    grad_accum_steps: int = 1,
    ema_decay: float = 0.0,
) -> tuple[TrainState, dict]:
    """One optimizer step on ``batch`` (the uint8 host-contract dict; unknown keys ignored).

    ``grad_accum_steps`` > 1 runs the batch as that many micro-batches (`micro_batches`) and makes one
    update from their summed gradients. ``ema_decay`` > 0 also updates the state's EMA of the
    parameters and BatchNorm statistics (`TrainState.ema_params`).

    Returns the new state and float32 scalar metrics: ``loss``, ``global``, ``local``,
    ``fusion``, ``composition`` (see `p3m_jax.train.losses.p3m_loss`), ``learning_rate`` (of this
    update; NaN without ``lr_schedule``) and ``grad_norm`` (global norm before clipping).
    """
    rng = dropout_key(state)
    if grad_accum_steps == 1:
        loss, parts, grads, batch_stats = _loss_and_grads(state, batch, model=model, fcp=fcp, rng=rng)
    else:
        loss, parts, grads, batch_stats = _accumulated_loss_and_grads(
            state, batch, grad_accum_steps, model=model, fcp=fcp, rng=rng
        )
    grad_norm = optax.tree.norm(grads)
    param_updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    lr = jnp.asarray(lr_schedule(state.step), jnp.float32) if lr_schedule is not None else jnp.float32(jnp.nan)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    if ema_decay > 0:
        new_state = new_state.replace(
            ema_params=ema_update(state.ema_params, params, ema_decay),
            ema_batch_stats=ema_update(state.ema_batch_stats, batch_stats, ema_decay),
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
    grad_accum_steps: int = 1,
    ema_decay: float = 0.0,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`train_step` jitted over ``mesh``: state in/out with ``state_sharding`` (from
    `state_shardings`), batch sharded on ``data``, metrics replicated, the state donated,
    compiled with the options of the mesh's platform (`p3m_jax.common.compile_options`)."""
    fn = functools.partial(
        train_step,
        model=model,
        optimizer=optimizer,
        lr_schedule=lr_schedule,
        fcp=fcp,
        grad_accum_steps=grad_accum_steps,
        ema_decay=ema_decay,
    )
    return jax.jit(
        fn,
        in_shardings=(state_sharding, batch_sharding(mesh)),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,) if donate else (),
        compiler_options=_mesh_compiler_options(mesh),
    )


def _mesh_compiler_options(mesh: Mesh) -> dict | None:
    return compiler_options(mesh.devices.flat[0].platform)


__all__ = [
    "StepOptions",
    "FCPOptions",
    "prepare_batch",
    "train_step",
    "eval_step",
    "make_train_step",
    "dropout_key",
    "micro_batches",
    "make_loss_fn",
    "ema_update",
]
