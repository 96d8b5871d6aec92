"""Scoring a predictor on a test split with the paper's RESIZE / HYBRID strategies.

Each prediction is quantized to 8 bits as the authors' evaluation reads it back from PNG, then scored
with `p3m_jax.evaluation.metrics.matting_metrics` against the ground-truth alpha and trimap (and the
facemask where the split has one: the PRIVACY group, averaged over the images that have a facemask).

Modes: `exact` runs the network and the metrics at each image's own shape (one XLA compilation per
distinct shape; the reference); `bucketed` (default) pads network inputs to multiples of `bucket`
(128) and metric inputs to multiples of `metric_bucket` (256). Padded metrics are exact (they see only
the valid region); the padded network input moves predictions slightly (see
benchmarks/bench_eval_compile.py for the measured deviation).
"""

from __future__ import annotations

import collections
import math
import time
from typing import Iterable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from p3m_jax.common import cli, image_io, storage
from p3m_jax.data.evaluation_data import plain_example
from p3m_jax.evaluation import metrics
from p3m_jax.inference import strategies


class CompileCounter:
    """Counts XLA backend compile events and persistent-cache hits while active (jax.monitoring events).

    A program loaded from the persistent cache produces both events; real compilations = compiles - cache_hits.
    """

    def __init__(self):
        self.compiles = 0
        self.compile_seconds = 0.0
        self.cache_hits = 0

    def _on_duration(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.compiles += 1
            self.compile_seconds += duration

    def _on_event(self, event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1

    def __enter__(self):
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc):
        from jax._src import monitoring  # the public module has no unregister functions

        monitoring.unregister_event_duration_listener(self._on_duration)
        monitoring.unregister_event_listener(self._on_event)
        return False


def _pad_to(x: np.ndarray, shape) -> np.ndarray:
    out = np.zeros(tuple(shape), x.dtype)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def score(pred_u8, alpha_u8, trimap, facemask=None, metric_bucket: int | None = None) -> dict[str, float]:
    """Metrics of one 8-bit prediction; with `metric_bucket` the arrays are padded (exactly) to multiples of it."""

    height, width = alpha_u8.shape
    pred = np.asarray(pred_u8, np.float32) / 255.0
    gt = np.asarray(alpha_u8, np.float32) / 255.0
    maps = [pred, gt, np.asarray(trimap)] + ([np.asarray(facemask)] if facemask is not None else [])
    sizes = None
    if metric_bucket:
        shape = strategies.bucket_shape(height, width, metric_bucket)
        maps = [_pad_to(m, shape) for m in maps]
        sizes = [[height, width]]
    maps = [m[None] for m in maps]
    result = metrics.matting_metrics(
        maps[0], maps[1], maps[2], facemask=maps[3] if facemask is not None else None, sizes=sizes
    )
    return {k: float(v[0]) for k, v in result.items()}


def evaluate(
    predictor,
    dataset: Sequence | Iterable,
    strategy: str = "hybrid",
    *,
    mode: str = "bucketed",
    bucket: int = 128,
    metric_bucket: int = 256,
    save_png_dir=None,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Scores `predictor` on every example of `dataset` with a test strategy.

    Args:
      predictor: a `p3m_jax.inference.Predictor` (anything with `forward`).
      dataset: examples with `image` (H, W, 3) uint8, `alpha` and `trimap` (H, W[, 1]) uint8, `name`, and
        optionally `facemask` / `has_facemask` (TFDS `p3m10k` examples or `FolderDataset` items).
      strategy: "hybrid" or "resize".
      mode: "exact" (every shape compiled as is) or "bucketed" (inputs padded, see the module docstring).
      save_png_dir: if given, the 8-bit predictions are written there as `<name>.png`.

    Returns:
      {"strategy", "mode", "count", "mean": {metric: dataset mean}, "per_image": [{"name", metrics...}],
       "network_shapes", "metric_shapes", "compiles", "cache_hits", "compile_seconds", "wall_seconds"}.
    """
    if mode not in ("exact", "bucketed"):
        raise ValueError(f"mode must be 'exact' or 'bucketed', got {mode!r}")
    if strategy.lower() not in strategies.STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {strategies.STRATEGIES}")
    runner = strategies.NetworkRunner(predictor, bucket if mode == "bucketed" else None)
    metric_pad = metric_bucket if mode == "bucketed" else None
    total = len(dataset) if hasattr(dataset, "__len__") else None
    if limit is not None and total is not None:
        total = min(total, limit)
    per_image, metric_shapes = [], collections.Counter()
    start = time.perf_counter()
    with CompileCounter() as counter:
        iterator = (dataset[i] for i in range(total)) if total is not None else iter(dataset)
        for index, raw in enumerate(
            cli.progress(iterator, total=total, enabled=progress, desc=f"eval {strategy}", unit="image")
        ):
            if limit is not None and index >= limit:
                break
            example = plain_example(raw)
            pred_u8 = strategies.quantize(strategies.predict_alpha(runner, example["image"], strategy))
            if save_png_dir is not None:
                image_io.save_png(storage.as_path(save_png_dir) / f"{example['name'] or index}.png", pred_u8)
            shape = example["alpha"].shape
            metric_shapes[strategies.bucket_shape(*shape, metric_pad) if metric_pad else shape] += 1
            per_image.append(
                {
                    "name": example["name"],
                    **score(pred_u8, example["alpha"], example["trimap"], example.get("facemask"), metric_pad),
                }
            )
    wall = time.perf_counter() - start
    keys = [k for k in per_image[0] if k != "name"] if per_image else []
    mean = {}
    for key in keys:
        values = np.array([row.get(key, math.nan) for row in per_image], np.float64)
        finite = values[~np.isnan(values)]
        mean[key] = float(finite.mean()) if finite.size else math.nan  # PRIVACY: images with a facemask only
    return {
        "strategy": strategy.lower(),
        "mode": mode,
        "count": len(per_image),
        "mean": mean,
        "per_image": per_image,
        "network_shapes": len(runner.input_shapes),
        "metric_shapes": len(metric_shapes),
        # the backend-compile event also fires for programs loaded from the persistent cache
        "compiles": counter.compiles - counter.cache_hits,
        "cache_hits": counter.cache_hits,
        "compile_seconds": round(counter.compile_seconds, 3),
        "wall_seconds": round(wall, 3),
    }


def combine_across_processes(per_image: list[dict]) -> tuple[dict, int]:
    """Dataset means over the images of every process (each scored its own share).

    PRIVACY metrics exist only for images with a facemask: means are NaN-aware per metric.
    """
    keys = metrics.METRIC_KEYS + metrics.PRIVACY_KEYS
    values = np.array([[row.get(k, math.nan) for k in keys] for row in per_image], np.float64).reshape(-1, len(keys))
    sums = np.nansum(values, axis=0)
    counts = np.sum(~np.isnan(values), axis=0).astype(np.float64)
    total = np.array([float(len(per_image))])
    if jax.process_count() > 1:
        sums, counts, total = (
            np.asarray(multihost_utils.process_allgather(x)).sum(axis=0) for x in (sums, counts, total)
        )
    means = {k: float(s / c) for k, s, c in zip(keys, sums, counts) if c}
    return means, int(total[0])


def evaluate_split(predictor, dataset, strategy: str, limit: int = 0) -> dict:
    """Scores ``dataset`` (this process's share) and returns the means over all processes."""
    result = evaluate(predictor, dataset, strategy, limit=limit or None, progress=False)
    means, count = combine_across_processes(result["per_image"])
    return {
        "strategy": strategy,
        "count": count,
        "mean": means,
        "per_image": result["per_image"] if jax.process_count() == 1 else None,
        "wall_seconds": result["wall_seconds"],
    }
