"""The progress of a training run: step metrics summed on the device between reads, the progress line
(loss and its parts, lr, images/s, step time, ETA), the same numbers in TensorBoard, and the NaN guard on
the loss."""

from __future__ import annotations

import datetime
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from p3m_jax.train.guards import NonFiniteLossError, last_good_checkpoint

LOSS_PARTS = ("loss", "global", "local", "fusion", "composition")
# P3M-CP: how many samples of a batch got a pasted face (ICP) / replaced features (FCP): batch key -> name.
CP_COUNTS = {"icp_pasted": "icp_pasted_per_batch", "fcp_apply": "fcp_samples_per_batch"}
# A one-process run prints progress at least this often whatever log_every_steps and the step time
# (slow CPU steps). Multi-process runs keep to log_every_steps: every process must stop on a NaN at
# the same step.
PROGRESS_EVERY_S = 30.0


def _format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class Progress:
    """Sums each step's metrics on the device (no per-step host synchronisation) and reports them when
    `due`: a line through ``log``, scalars through ``writer``. ``checkpointer`` is waited on and named
    when the loss turns non-finite."""

    def __init__(self, config, num_devices: int, first_step: int, writer, checkpointer, log: Callable[[str], Any]):
        self.config, self.num_devices, self.first_step = config, num_devices, first_step
        self.writer, self.checkpointer, self.log = writer, checkpointer, log
        self._sums, self._steps, self._start = None, 0, time.perf_counter()

    def add(self, metrics: dict, batch: dict) -> None:
        metrics = dict(metrics)
        metrics.update(
            {name: jnp.sum(batch[key], dtype=jnp.float32) for key, name in CP_COUNTS.items() if key in batch}
        )
        self._sums = metrics if self._sums is None else jax.tree_util.tree_map(jnp.add, self._sums, metrics)
        self._steps += 1

    def due(self, step: int) -> bool:
        """The first step (it includes the compile), every log_every_steps, and overdue one-process runs."""
        overdue = jax.process_count() == 1 and time.perf_counter() - self._start >= PROGRESS_EVERY_S
        return step == self.first_step + 1 or step % self.config.log_every_steps == 0 or overdue

    def flush(self, step: int) -> None:
        """Reads the metrics summed since the last read: logs them, and stops on NaN/Inf."""
        if self._steps == 0:
            return
        sums = jax.device_get(self._sums)
        means = {k: float(v) / self._steps for k, v in sums.items()}
        elapsed, steps = time.perf_counter() - self._start, self._steps
        self._sums, self._steps, self._start = None, 0, time.perf_counter()
        if not all(math.isfinite(means.get(k, 0.0)) for k in LOSS_PARTS):
            self.checkpointer.wait()
            raise NonFiniteLossError(
                f"non-finite training loss between steps {step - steps + 1} and {step} "
                f"({', '.join(f'{k}={means.get(k)}' for k in LOSS_PARTS)}); stopped without saving it. "
                f"{last_good_checkpoint(self.checkpointer)} "
                f"Lower config.optimizer.learning_rate or set config.optimizer.grad_clip_norm."
            )
        self._report(step, means, elapsed, steps)

    def _report(self, step: int, means: dict, elapsed: float, steps: int) -> None:
        total = self.config.num_train_steps
        losses = (
            f"loss {means['loss']:.4f} (global {means['global']:.4f} local {means['local']:.4f} "
            f"fusion {means['fusion']:.4f} comp {means['composition']:.4f})"
        )
        scalars = {f"train/{k}": v for k, v in means.items()}
        if step == self.first_step + 1:  # this step also compiled the program: no speed to report
            self.writer.write_scalars(step, scalars)
            self.log(f"step {step}/{total} | {losses} | first step incl. compilation {elapsed:.1f} s")
            return
        per_step = elapsed / steps
        images_per_s = self.config.batch_size / per_step
        per_device = images_per_s / self.num_devices
        self.writer.write_scalars(
            step,
            {
                **scalars,
                "train/images_per_second": images_per_s,
                "train/images_per_second_per_device": per_device,
                "train/step_seconds": per_step,
            },
        )
        self.log(
            f"step {step}/{total} | {losses} | lr {means.get('learning_rate', math.nan):.2e} | "
            f"{images_per_s:.1f} img/s ({per_device:.1f}/device) | {per_step:.3f} s/step | "
            f"ETA {_format_eta(per_step * (total - step))}"
            + "".join(f" | {name} {means[name]:.2f}" for name in CP_COUNTS.values() if name in means)
        )


__all__ = ["CP_COUNTS", "LOSS_PARTS", "PROGRESS_EVERY_S", "Progress"]
