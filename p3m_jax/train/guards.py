"""What stops a run cleanly: SIGTERM (save and stop, agreed across processes) and NaN/Inf in the
loss or the state (stop before anything non-finite is validated or saved)."""

from __future__ import annotations

import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


class NonFiniteLossError(FloatingPointError):
    """The training loss or state (parameters, BatchNorm statistics, optimizer state) became NaN
    or infinite; nothing non-finite was saved and the last good checkpoint is kept."""


class PreemptionWatcher:
    """Turns SIGTERM into a flag the loop checks between steps (agreed across processes)."""

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):  # noqa: ARG002
        self._flag.set()

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            # Every process must stop at the same step to save together: jax's preemption sync
            # point agrees on one (it is notified of SIGTERM by the distributed runtime).
            return bool(multihost_utils.reached_preemption_sync_point(step)) or self._flag.is_set()
        return self._flag.is_set()

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


@jax.jit
def _finite_leaves(tree) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)])


def _key_name(key) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def first_non_finite_leaf(state) -> str | None:
    """The path (e.g. ``batch_stats/decoder/tfi_0/bn1/var``) of the first leaf of the state's
    parameters, BatchNorm statistics or optimizer state that holds a NaN or Inf, or None.

    One reduction per leaf on the devices and a single read of the flags; called only where the
    loop validates or saves."""
    tree = {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}
    flags = np.asarray(jax.device_get(_finite_leaves(tree)))
    if flags.all():
        return None
    path, _ = jax.tree_util.tree_flatten_with_path(tree)[0][int(np.argmin(flags))]
    return "/".join(_key_name(k) for k in path)


def last_good_checkpoint(checkpointer) -> str:
    latest = checkpointer.latest_step()
    if latest is None:
        return "No checkpoint was saved before it."
    return f"The last good checkpoint is step {latest} in {checkpointer.directory}."
