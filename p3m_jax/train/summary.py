"""Training logs: TensorBoard event files (tensorboardX, no TensorFlow) plus a JSON-lines copy.

Only process 0 writes; on every other process the writer is a no-op, so the loop can call it
unconditionally. `metrics.jsonl` in the workdir holds the same scalars one JSON object per line,
for scripts and tests that should not depend on TensorBoard's reader.

A ``gs://`` workdir has no append: the event file and `metrics.jsonl` are written in a local staging
folder and uploaded whole at most every `UPLOAD_EVERY_S` seconds, at every `flush` (the loop flushes
at each checkpoint save) and at `close`. A run killed without warning loses at most the rows of that
interval, which a resumed run drops anyway when they come after its checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
import numpy as np

from p3m_jax.common import storage
from p3m_jax.common.constants import METRICS_FILE
from p3m_jax.common.fileio import atomic_write


UPLOAD_EVERY_S = 30.0  # how often the logs of a gs:// workdir reach the bucket while a run goes on


def log(message: str) -> None:
    """A line of the run's log, printed by process 0 only."""
    if jax.process_index() == 0:
        print(message, flush=True)


def drop_rows_after(path: str | os.PathLike, step: int) -> None:
    """Rewrites a JSON-lines log without its rows of steps after ``step`` (a resumed run logs
    them again). A missing file is left missing."""
    path = storage.resolve(path)
    try:
        with storage.reported(path, "reading"):
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return
    kept = [line for line in lines if line.strip() and _row_step(line) <= step]
    if len(kept) != len(lines):
        with atomic_write(path) as f:
            f.writelines(kept)


def append_row(path: str | os.PathLike, row: Mapping) -> None:
    """Adds one JSON line to a log: appended to a local file; an object is read and written whole
    (for logs written rarely, such as the validation log)."""
    path = storage.resolve(path)
    line = json.dumps(dict(row)) + "\n"
    if not storage.is_remote(path):
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
        return
    with storage.reported(path, "appending to"):
        previous = path.read_text(encoding="utf-8") if path.exists() else ""
    storage.write_object(path, (previous + line).encode("utf-8"))


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
      logdir: folder for the event files and ``metrics.jsonl`` (created), local or ``gs://``.
      enabled: False on processes other than 0: every call does nothing.
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True):
        self.enabled = enabled
        self.logdir = os.fspath(logdir)
        self._tb = None
        self._jsonl = None
        self._staged: storage.StagedFolder | None = None

    def _open(self) -> None:
        """Opens the files at the first write, so that a run stopped before logging anything
        (e.g. killed while compiling) leaves no empty event file."""
        if self._tb is not None:
            return
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel

        self._staged = storage.StagedFolder(self.logdir, min_interval_s=UPLOAD_EVERY_S)
        local = self._staged.local
        os.makedirs(local, exist_ok=True)
        if self._staged.remote:  # the rows of earlier runs, appended to in the staging folder
            remote_rows = self._staged.destination / METRICS_FILE
            with storage.reported(remote_rows, "reading"):
                if remote_rows.exists():
                    with open(os.path.join(local, METRICS_FILE), "wb") as f:
                        f.write(remote_rows.read_bytes())
        self._tb = SummaryWriter(local, flush_secs=30)
        self._jsonl = open(os.path.join(local, METRICS_FILE), "a", encoding="utf-8")

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
        if self._staged.remote:
            self._tb.flush()
            self._staged.sync(force=False)

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
        """Writes what is buffered; for a bucket, uploads the changed files now."""
        if self.enabled and self._tb is not None:
            self._tb.flush()
            self._jsonl.flush()
            self._staged.sync()

    def close(self) -> None:
        if self.enabled and self._tb is not None:
            self._tb.close()
            self._jsonl.close()
            self._staged.close()
        self.enabled = False
