"""A profiler window: a `jax.profiler` trace of the training steps that `config.profile_steps` names,
written under the workdir for TensorBoard's profile tab (xplane.pb) or Perfetto (perfetto_trace.json.gz).
For a ``gs://`` workdir the trace is written locally and uploaded when it stops."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax

from p3m_jax.common import storage
from p3m_jax.common.errors import check


@dataclasses.dataclass(frozen=True)
class ProfileWindow:
    """Steps ``first`` to ``last``, both included, numbered as in the progress lines (step 1 is the
    first update, whose time includes the compilation)."""

    first: int
    last: int

    def __post_init__(self):
        check(
            1 <= self.first <= self.last,
            "profile_steps",
            f"needs 1 <= FIRST <= LAST, got {self.first}:{self.last}",
        )

    @classmethod
    def from_config(cls, profile_steps: str) -> "ProfileWindow | None":
        """From ``config.profile_steps``: "" (no trace) or "FIRST:LAST", e.g. "10:15"."""
        text = str(profile_steps).strip()
        if not text:
            return None
        parts = text.split(":")
        check(
            len(parts) == 2 and all(p.strip().isdigit() for p in parts),
            "profile_steps",
            f"expected 'FIRST:LAST' (two step numbers, e.g. '10:15') or '', got {profile_steps!r}",
        )
        return cls(int(parts[0]), int(parts[1]))


class StepProfiler:
    """Starts the trace before the window's first step runs and stops it once its last step has
    finished on the device. A run resumed inside the window traces the steps it still runs."""

    def __init__(self, window: ProfileWindow | None, directory: str, log: Callable[[str], Any]):
        self.window, self.directory, self.log = window, directory, log
        self.active, self.started = False, 0

    def before_step(self, step: int) -> None:
        """``step``: the number the coming step will have."""
        if self.window and not self.active and self.window.first <= step <= self.window.last:
            self._staged = storage.StagedFolder(self.directory)
            os.makedirs(self._staged.local, exist_ok=True)
            jax.profiler.start_trace(self._staged.local, create_perfetto_trace=True)
            self.active, self.started = True, step

    def after_step(self, step: int, state: Any) -> None:
        if self.active and step >= self.window.last:
            jax.block_until_ready(state)  # the trace holds the last step's device work
            self.stop(step)

    def stop(self, step: int) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self._staged.close()
            self.active = False
            self.log(
                f"profile of steps {self.started}-{step} written to {self.directory} (TensorBoard's profile tab: "
                f"tensorboard --logdir {self.directory}; or perfetto_trace.json.gz at ui.perfetto.dev)"
            )


__all__ = ["ProfileWindow", "StepProfiler"]
