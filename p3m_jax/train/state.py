"""Training state (one pytree) and its shardings.

`TrainState` holds everything a step reads and writes: the step counter, float32 parameters,
BatchNorm running statistics, the ``constants`` collection (ViTAE-S's fixed Performer
features; an empty dict for the other variants), the optax state, a PRNG key and, when
``config.ema_decay`` > 0, an exponential moving average of the parameters and of the BatchNorm
running statistics (empty dicts otherwise). Parameters, their EMA and the optimizer state stay
float32 whatever the compute dtype of the model.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from p3m_jax.models import init_variables
from p3m_jax.train.mesh import DATA_AXIS

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """step (int32 scalar), params, batch_stats, constants, opt_state, rng (typed PRNG key), and
    ema_params / ema_batch_stats (empty without EMA)."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    constants: PyTree
    opt_state: PyTree
    rng: jax.Array
    ema_params: PyTree = flax.struct.field(default_factory=dict)
    ema_batch_stats: PyTree = flax.struct.field(default_factory=dict)

    def variables(self) -> dict[str, PyTree]:
        """The model variables for ``model.apply`` (empty collections left out)."""
        out = {"params": self.params}
        if self.batch_stats:
            out["batch_stats"] = self.batch_stats
        if self.constants:
            out["constants"] = self.constants
        return out

    def ema_variables(self) -> dict[str, PyTree]:
        """`variables` with the EMA of the parameters and BatchNorm statistics in their place."""
        if not self.ema_params:
            raise ValueError("this train state keeps no EMA of its parameters (config.ema_decay is 0)")
        out = {**self.variables(), "params": self.ema_params}
        if self.ema_batch_stats:
            out["batch_stats"] = self.ema_batch_stats
        return out


def create_train_state(
    model,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    image_size: int | tuple[int, int] = 64,
    variables: PyTree | None = None,
    ema: bool = False,
) -> TrainState:
    """A fresh `TrainState`.

    Args:
      model: a P3M-Net from ``build_model``.
      optimizer: from `optimizer.make_optimizer`.
      rng: a PRNG key; split into the init key and the state's key (dropout etc.).
      image_size: size of the dummy input used for initialization.
      variables: start from these model variables (e.g. imported weights) instead of a random
        init; must hold ``params`` and may hold ``batch_stats`` and ``constants``.
      ema: keep an EMA of the parameters and BatchNorm statistics, starting from their values.
    """
    if not jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng) if jnp.asarray(rng).shape else jax.random.key(rng)
    init_rng, state_rng = jax.random.split(rng)
    if variables is None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        variables = jax.jit(lambda r: init_variables(model, r, size))(init_rng)
    variables = flax.core.unfreeze(variables)
    to_f32 = lambda x: jnp.asarray(x, jnp.float32)
    params = jax.tree_util.tree_map(to_f32, variables["params"])
    batch_stats = jax.tree_util.tree_map(to_f32, variables.get("batch_stats", {}))
    constants = jax.tree_util.tree_map(jnp.asarray, variables.get("constants", {}))
    copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        constants=constants,
        opt_state=optimizer.init(params),
        rng=state_rng,
        ema_params=copy(params) if ema else {},
        ema_batch_stats=copy(batch_stats) if ema else {},
    )


def fsdp_spec(shape, num_shards: int) -> P:
    """Shards the largest axis of ``shape`` divisible by ``num_shards`` on ``data``;
    replicated when none is (scalars, small vectors)."""
    best = None
    for axis, size in enumerate(shape):
        if size % num_shards == 0 and size >= num_shards and (best is None or size > shape[best]):
            best = axis
    if best is None or num_shards == 1:
        return P()
    spec = [None] * len(shape)
    spec[best] = DATA_AXIS
    return P(*spec)


def state_shardings(state: PyTree, mesh: Mesh, param_sharding: str = "replicated") -> PyTree:
    """NamedShardings matching ``state`` (a `TrainState` of arrays or of ShapeDtypeStructs).

    ``replicated``: every leaf replicated. ``fsdp``: parameters, their EMA and optimizer-state
    leaves are sharded on ``data`` along their largest divisible axis (the same rule for a
    parameter, its EMA and its Adam moments); step, rng, BatchNorm statistics (and their EMA) and
    constants stay replicated.
    """
    if param_sharding not in ("replicated", "fsdp"):
        raise ValueError(f"param_sharding must be 'replicated' or 'fsdp', got {param_sharding!r}")
    rep = NamedSharding(mesh, P())
    n = mesh.shape[DATA_AXIS]

    def sharded(leaf):
        if param_sharding == "replicated":
            return rep
        return NamedSharding(mesh, fsdp_spec(np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape, n))

    all_rep = lambda tree: jax.tree_util.tree_map(lambda _: rep, tree)
    return TrainState(
        step=rep,
        params=jax.tree_util.tree_map(sharded, state.params),
        batch_stats=all_rep(state.batch_stats),
        constants=all_rep(state.constants),
        opt_state=jax.tree_util.tree_map(sharded, state.opt_state),
        rng=rep,
        ema_params=jax.tree_util.tree_map(sharded, state.ema_params),
        ema_batch_stats=all_rep(state.ema_batch_stats),
    )


def create_sharded_train_state(
    model,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    image_size: int | tuple[int, int],
    mesh: Mesh,
    param_sharding: str = "replicated",
    variables: PyTree | None = None,
    ema: bool = False,
) -> tuple[TrainState, TrainState]:
    """`create_train_state` run under ``jit`` straight into its shardings (every process
    must pass the same ``rng``). Returns ``(state, shardings)``."""
    make = lambda r, v: create_train_state(model, optimizer, r, image_size, v, ema=ema)
    abstract = jax.eval_shape(make, rng, variables)
    shardings = state_shardings(abstract, mesh, param_sharding)
    state = jax.jit(make, out_shardings=shardings)(rng, variables)
    return state, shardings


__all__ = [
    "TrainState",
    "create_train_state",
    "create_sharded_train_state",
    "state_shardings",
    "fsdp_spec",
]
