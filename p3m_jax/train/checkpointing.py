"""Training checkpoints with orbax's `CheckpointManager`: state + input-iterator state, best by SAD.

Layout of ``<workdir>/checkpoints``::

    <step>/state/   the `TrainState` (params, batch_stats, constants, opt_state, step, rng as raw key data)
    <step>/data/    the grain iterator's state (one file per process)
    <step>/metrics/ the validation metrics of that step, when it was evaluated

Saves are asynchronous: `save` returns as soon as the arrays are copied off the devices and the
files are written in the background; `poll` (called every step) raises `CheckpointError` as soon as
such a save has failed, naming its step and cause. orbax writes every checkpoint into a temporary directory
and renames it only once complete, so a save that was killed half-way is never restored from
(and leftovers are cleaned up on the next start). Retention keeps the last ``keep`` checkpoints
plus the best one by validation SAD.

Restoring goes through an abstract target whose leaves carry the *current* mesh's shardings, so
a run saved on 8 devices resumes on 1 (or 2, or 8) without conversion.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import logging
import os
import shutil
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from p3m_jax.common import storage
from p3m_jax.weights import workdir_checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (message names the directory and the cause)."""


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


# Fields saved only when not empty -> the field they start from when a run turns them on mid-way.
_OPTIONAL_FIELDS = {"ema_params": "params", "ema_batch_stats": "batch_stats"}


def _fields(state: Any) -> dict:
    """A dataclass state as a plain dict of its fields (orbax names the saved tree by them). The EMA
    fields are left out when empty, so a run without EMA saves (and restores) the same tree as before
    EMA existed."""
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    return {k: v for k, v in fields.items() if not (k in _OPTIONAL_FIELDS and not jax.tree_util.tree_leaves(v))}


def to_savable(state: Any) -> dict:
    """The state as a dict, typed PRNG keys replaced by their raw uint32 key data."""
    return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_key(x) else x, _fields(state))


def _abstract_key_data(x):
    shape = jax.eval_shape(jax.random.key_data, x)
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)


def abstract_savable(abstract_state: Any) -> dict:
    """The restore target matching `to_savable` for an abstract state (ShapeDtypeStructs with shardings)."""
    return jax.tree_util.tree_map(lambda x: _abstract_key_data(x) if _is_key(x) else x, _fields(abstract_state))


def _key_impl_name(key) -> str:
    """The PRNG implementation of a key array or of an abstract key (dtype ``key<rbg>`` -> "rbg")."""
    if isinstance(key, jax.Array):
        return str(jax.random.key_impl(key))
    return str(key.dtype)[len("key<") : -1]  # abstract keys expose their impl only in the dtype name


def from_savable(restored: dict, like: Any) -> Any:
    """Undoes `to_savable`, using ``like`` (the live or abstract state) to know which leaves are keys."""

    def back(data, ref):
        if _is_key(ref):
            return jax.random.wrap_key_data(data, impl=_key_impl_name(ref))
        return data

    return like.replace(**jax.tree_util.tree_map(back, restored, _fields(like)))


_ORBAX_PATH = os.path.join("orbax", "checkpoint", "")


class _SaveErrorLog(logging.Filter):
    """While one save is in flight: holds back the ERROR records that orbax logs (through absl) about it,
    each with a long traceback and one per background thread of a failed save. A failed save reports
    them in its CheckpointError; a save that succeeds logs them as they were. Nothing else is touched."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger("absl")  # orbax logs through absl.logging
        self.logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and _ORBAX_PATH in record.pathname:
            self.records.append(record)
            return False
        return True

    def close(self, failed: bool) -> str:
        """Stops holding records back; logs them if the save did not fail, else returns a note on them."""
        self.logger.removeFilter(self)
        if not failed:
            for record in self.records:
                self.logger.handle(record)
            return ""
        if not self.records:
            return ""
        first = self.records[0].getMessage().strip().splitlines()[0]
        return f" (orbax logged {len(self.records)} error(s) from the save's threads; the first: {first})"


def _is_closed_loop_callback(unraisable) -> bool:
    """When a save fails, tensorstore still completes the save's outstanding writes and calls back into
    orbax's event loop, closed by then: each callback reports ``RuntimeError: Event loop is closed`` as an
    unraisable exception, entered from native code (its traceback starts in call_soon_threadsafe)."""
    value, traceback = unraisable.exc_value, unraisable.exc_traceback
    return (
        isinstance(value, RuntimeError)
        and str(value) == "Event loop is closed"
        and traceback is not None
        and traceback.tb_frame.f_code.co_name == "call_soon_threadsafe"
    )


class TrainCheckpointer:
    """Owns ``<workdir>/checkpoints``: asynchronous saves, retention, best-by-SAD, resume.

    Args:
      directory: where the step folders live (created; must be writable).
      keep: how many of the most recent checkpoints to keep (the best by SAD is kept in addition).
      asynchronous: write in a background thread (default) or block in `save`.
      read_only: only read (another run may be writing: its unfinished saves are left alone).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 2,
        asynchronous: bool = True,
        read_only: bool = False,
        log: Callable[[str], None] | None = None,
    ):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.directory = os.fspath(storage.resolve(directory))  # a local folder or a gs:// prefix
        self.keep = keep
        self._log = log or (lambda message: None)
        self._pending_step: int | None = None  # the step of the save still in flight
        self._checkpoint_bytes = 0  # the state's size, estimated at the first save
        self._failed = False
        self._save_errors: _SaveErrorLog | None = None  # orbax's error records of the save in flight
        self._previous_unraisablehook = None  # set from a failed save until close()
        try:
            self.manager = workdir_checkpoints.open_manager(
                self.directory, keep=keep, asynchronous=asynchronous, read_only=read_only
            )
        except OSError as e:
            raise CheckpointError(f"cannot use checkpoint directory {self.directory}: {e}") from e

    # ------------------------------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        state: Any,
        data_iterator: Any | None,
        *,
        metrics: dict[str, float] | None = None,
        force: bool = True,
    ) -> None:
        """Starts an (asynchronous) save of ``state`` and the iterator's state at ``step``."""
        import grain  # pylint: disable=import-outside-toplevel

        savable = to_savable(state)
        if not self._checkpoint_bytes:
            self._checkpoint_bytes = sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(savable))
            self._check_free_space()
        self.wait()  # a failure of the previous save is reported against its own step
        items = {"state": ocp.args.StandardSave(savable)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._save_errors = _SaveErrorLog()
        try:
            self.manager.save(
                step, args=ocp.args.Composite(**items), force=force, metrics=dict(metrics) if metrics else None
            )
        except Exception as e:  # pylint: disable=broad-except  (disk full, permissions)
            message = self._failure_message(step, e)
        else:
            self._pending_step = step
            return
        raise CheckpointError(self._fail(message))

    def poll(self) -> None:
        """Raises CheckpointError as soon as the save in flight has failed; otherwise returns at once.

        Cheap enough for every step: it only asks whether the background save is still running.
        """
        if self._pending_step is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until the pending save is on disk (raises CheckpointError, naming its step, if it
        failed)."""
        step, self._pending_step = self._pending_step, None
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # pylint: disable=broad-except
            message = self._failure_message(step, e)
        else:
            if self._save_errors is not None:
                self._save_errors.close(failed=False)
                self._save_errors = None
            return
        # Raised without the background error chained: its traceback holds the failed save's
        # coroutines, which would otherwise be finalised at interpreter exit with an error each.
        raise CheckpointError(self._fail(message))

    def _fail(self, message: str) -> str:
        """Marks the checkpointer failed; returns ``message`` with orbax's held-back errors noted. From
        now until `close`, the failed save's closed-event-loop callbacks (which say nothing the
        CheckpointError does not) are not printed; every other unraisable exception still is."""
        self._failed = True
        if self._save_errors is not None:
            message += self._save_errors.close(failed=True)
            self._save_errors = None
        if self._previous_unraisablehook is None:
            previous = self._previous_unraisablehook = sys.unraisablehook
            sys.unraisablehook = lambda unraisable: (
                None if _is_closed_loop_callback(unraisable) else previous(unraisable)
            )
        return message

    def close(self) -> None:
        """Waits for a save in flight and releases the manager. After a failed save, errors of
        the shutdown are not raised again (the failure was reported), and the failed save's
        leftovers are collected now rather than at interpreter exit."""
        try:
            self.manager.close()
        except Exception:  # pylint: disable=broad-except
            if not self._failed:
                raise
        finally:
            if self._save_errors is not None:
                self._save_errors.close(failed=self._failed)
                self._save_errors = None
        if self._failed:
            gc.collect()
            if self._previous_unraisablehook is not None:
                sys.unraisablehook, self._previous_unraisablehook = self._previous_unraisablehook, None

    def _finished_steps(self) -> list[int]:
        """Steps whose checkpoint folder is complete (orbax renames a folder only once written)."""
        try:
            names = [p.name for p in storage.resolve(self.directory).iterdir()]
        except OSError:
            return []
        return sorted(int(n) for n in names if n.isdigit())

    def _failure_message(self, step: int | None, error: BaseException) -> str:
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            if isinstance(cause, OSError):
                break
            cause = cause.__cause__ or cause.__context__
        if not isinstance(cause, OSError):
            cause = error
        what = f"saving step {step}" if step is not None else "a checkpoint save"
        message = f"{what} to {self.directory} failed: {cause}"
        # tensorstore reports a full disk as RESOURCE_EXHAUSTED with the OS error code in the text.
        if (
            (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT))
            or f"os_error_code='{errno.ENOSPC}'" in str(cause)
            or "No space left" in str(cause)
        ):
            message += f" ({self._space_needed()})"
        good = [s for s in self._finished_steps() if s != step]
        message += (
            f"; the earlier checkpoints are intact (latest: step {good[-1]})"
            if good
            else "; no earlier checkpoint exists"
        )
        return message

    def _space_needed(self) -> str:
        mb = lambda n: f"{n / 2**20:.0f} MB"  # noqa: E731
        try:
            free = mb(shutil.disk_usage(self.directory).free)
        except (OSError, ValueError):
            free = "unknown"
        return (
            f"a checkpoint needs ~{mb(self._checkpoint_bytes)}, keeping {self.keep} needs room for "
            f"{self.keep + 1} at once (~{mb((self.keep + 1) * self._checkpoint_bytes)}); "
            f"{free} free"
        )

    def _check_free_space(self) -> None:
        """Warns when the filesystem cannot hold ``keep`` + 1 checkpoints (a new one is written
        before the oldest is deleted). A bucket has no such limit to read."""
        if storage.is_remote(self.directory):
            return
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            return
        if free < (self.keep + 1) * self._checkpoint_bytes:
            self._log(f"warning: {self.directory} may run out of space: {self._space_needed()}")

    # --------------------------------------------------------------------------------------- restore
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the lowest validation SAD (the latest when none was evaluated)."""
        return workdir_checkpoints.best_or_latest_step(self.manager)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> Any:
        """Restores the state onto ``abstract_state``'s shardings; sets the iterator's state in place."""
        import grain  # pylint: disable=import-outside-toplevel

        saved = workdir_checkpoints.saved_state_fields(self.directory, step)
        wanted = _fields(abstract_state)
        unwanted = sorted(f for f in _OPTIONAL_FIELDS if f in saved and f not in wanted)
        if unwanted:
            raise CheckpointError(
                f"{self.directory}/{step} keeps an EMA of the parameters ({', '.join(unwanted)}) but this run has "
                f"config.ema_decay=0: set config.ema_decay to the run's value to resume it"
            )
        started = [f for f in _OPTIONAL_FIELDS if f in wanted and f not in saved]
        target = abstract_state.replace(**{f: {} for f in started})
        items = {"state": ocp.args.StandardRestore(abstract_savable(target))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = from_savable(restored["state"], target)
        if started:  # EMA turned on for a run saved without it: it starts from the restored weights
            self._log(f"{', '.join(started)}: not in checkpoint {step}; starting the EMA from its weights")
            copies = {f: jax.tree_util.tree_map(jnp.copy, getattr(state, _OPTIONAL_FIELDS[f])) for f in started}
            state = state.replace(**copies)
        return state
