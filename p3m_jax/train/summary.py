"""Training logs: TensorBoard event files (tensorboardX, no TensorFlow) plus a JSON-lines copy.

Only process 0 writes; on every other process the writer is a no-op, so the loop can call it
unconditionally. `metrics.jsonl` in the workdir holds the same scalars one JSON object per line,
for scripts and tests that should not depend on TensorBoard's reader.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
import numpy as np

from p3m_jax.common.constants import METRICS_FILE
from p3m_jax.common.fileio import atomic_write


def log(message: str) -> None:
    """A line of the run's log, printed by process 0 only."""
    if jax.process_index() == 0:
        print(message, flush=True)


def drop_rows_after(path: str | os.PathLike, step: int) -> None:
    """Rewrites a JSON-lines log without its rows of steps after ``step`` (a resumed run logs
    them again). A missing file is left missing."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return
    kept = [line for line in lines if line.strip() and _row_step(line) <= step]
    if len(kept) != len(lines):
        with atomic_write(path) as f:
            f.writelines(kept)


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return math.inf  # a line torn by a killed run: dropped


def summary_panel(image, true_alpha, predicted_alpha) -> np.ndarray:
    """One validation image for TensorBoard, (H, 4W, 3) uint8: the input, the ground-truth matte, the
    prediction and the absolute error (white: 1), side by side."""
    image = np.asarray(image, np.uint8)
    true01 = np.asarray(true_alpha, np.float32).reshape(image.shape[:2])
    true01 = true01 / 255.0 if np.asarray(true_alpha).dtype == np.uint8 else true01
    predicted01 = np.asarray(predicted_alpha, np.float32).reshape(image.shape[:2])
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    mattes = [true01, predicted01, np.abs(predicted01 - true01)]
    gray = [np.repeat((np.clip(m, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=2) for m in mattes]
    return np.concatenate([image[..., :3], *gray], axis=1)


class MetricWriter:
    """Scalars and images for TensorBoard, with the method names of clu's `MetricWriter`.

    Args:
      logdir: folder for the event files and ``metrics.jsonl`` (created).
      enabled: False on processes other than 0: every call does nothing.
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True):
        self.enabled = enabled
        self.logdir = os.fspath(logdir)
        self._tb = None
        self._jsonl = None

    def _open(self) -> None:
        """Opens the files at the first write, so that a run stopped before logging anything
        (e.g. killed while compiling) leaves no empty event file."""
        if self._tb is not None:
            return
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

        os.makedirs(self.logdir, exist_ok=True)
        self._tb = SummaryWriter(self.logdir, flush_secs=30)
        self._jsonl = open(os.path.join(self.logdir, METRICS_FILE), "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """One value per name at ``step`` (names like ``train/loss``, ``val/SAD``)."""
        if not self.enabled:
            return
        self._open()
        row = {"step": int(step)}
        for name, value in scalars.items():
            value = float(value)
            self._tb.add_scalar(name, value, int(step))
            row[name] = value if math.isfinite(value) else str(value)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """(H, W) or (H, W, C) images, uint8 or float in [0, 1]."""
        if not self.enabled:
            return
        self._open()
        for name, image in images.items():
            image = np.asarray(image)
            if image.ndim == 2:
                image = image[..., None]
            if image.dtype != np.uint8:
                image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            self._tb.add_image(name, image, int(step), dataformats="HWC")

    def write_text(self, step: int, texts: Mapping[str, str]) -> None:
        """Text entries, e.g. the run's config."""
        if not self.enabled:
            return
        self._open()
        for name, text in texts.items():
            self._tb.add_text(name, text, int(step))

    def flush(self) -> None:
        if self.enabled and self._tb is not None:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled and self._tb is not None:
            self._tb.close()
            self._jsonl.close()
        self.enabled = False
