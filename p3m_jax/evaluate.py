"""Evaluation on P3M-500-P / P3M-500-NP with the paper's RESIZE and HYBRID strategies.

    python -m p3m_jax.evaluate --checkpoint CKPT [--arch resnet34] --data_dir /data/P3M-10k \
        [--split p3m_500_p,p3m_500_np] [--strategy hybrid|resize] [--mode bucketed|exact] \
        [--output results.json] [--save_png DIR] [--limit N]
    python -m p3m_jax.evaluate --checkpoint CKPT --tfds_data_dir ~/tensorflow_datasets --tfds_config default ...

Data comes from a folder in the release layout (docs/design.md section 2; `--data_dir` may be the folder holding
`P3M-10k/`, `P3M-10k/` itself, or its `validation/`) or from the TFDS builder `p3m10k` (`tfds.data_source`).
Each prediction is quantized to 8 bits as the authors' evaluation reads it back from PNG, then scored with
`p3m_jax.metrics.matting_metrics` against the ground-truth alpha and trimap (and the facemask where the
split has one: the PRIVACY group, averaged over the images that have a facemask).

Modes: `exact` runs the network and the metrics at each image's own shape (one XLA compilation per distinct
shape; the reference); `bucketed` (default) pads network inputs to multiples of `bucket` (128) and metric
inputs to multiples of `metric_bucket` (256). Padded metrics are exact (they see only the valid region);
the padded network input moves predictions slightly (see benchmarks/bench_eval_compile.py for the measured
deviation). Compiled programs are kept in JAX's persistent compilation cache (`--cache_dir`).

The test sets are found before the weights load: a wrong folder, an unbuilt TFDS dataset or a missing or
unreadable checkpoint stops it at once with one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import collections
import collections.abc
import json
import math
import os
import pathlib
import sys
import time
from typing import Iterable, Sequence

import numpy as np

from p3m_jax import image_io, inference, metrics
from p3m_jax.fileio import atomic_write

SPLITS = {
    # split name -> (folder under the release root, image folder)
    "p3m_500_p": ("validation/P3M-500-P", "blurred_image"),
    "p3m_500_np": ("validation/P3M-500-NP", "original_image"),
}
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "p3m_jax", "xla")
REPORTED_KEYS = ("SAD", "MSE", "MAD", "SAD_T", "GRAD", "CONN")  # what the papers report
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


# ----------------------------------------------------------------------------------------------- datasets
class FolderDataset(collections.abc.Sequence):
    """One test split read from a folder in the release layout; items are dicts like the TFDS examples."""

    def __init__(self, root, split: str):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
        self.split = split
        self.folder = _find_split_folder(pathlib.Path(root), split)
        image_folder = self.folder / SPLITS[split][1]
        self.images = {p.stem: p for p in sorted(image_folder.iterdir()) if p.suffix.lower() in _IMAGE_EXTENSIONS}
        if not self.images:
            raise FileNotFoundError(f"no images in {image_folder}")
        self.names = sorted(self.images)
        for sub in ("mask", "trimap"):
            missing = [n for n in self.names if not self._map_path(sub, n)]
            if missing:
                raise FileNotFoundError(f"{self.folder / sub}: no file for {len(missing)} image(s), e.g. {missing[0]}")

    def _map_path(self, sub: str, name: str):
        for ext in (".png", ".jpg", ".jpeg"):
            path = self.folder / sub / (name + ext)
            if path.exists():
                return path
        return None

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        name = self.names[index]
        example = {
            "name": name,
            "image": image_io.load_rgb(self.images[name]),
            "alpha": image_io.load_gray(self._map_path("mask", name)),
            "trimap": image_io.load_gray(self._map_path("trimap", name)),
        }
        facemask = self._map_path("facemask", name)
        example["has_facemask"] = facemask is not None
        if facemask is not None:
            example["facemask"] = image_io.load_gray(facemask)
        return example


def _find_split_folder(root: pathlib.Path, split: str) -> pathlib.Path:
    relative = pathlib.Path(SPLITS[split][0])
    candidates = [root / relative, root / "P3M-10k" / relative, root / relative.name, root]
    for candidate in candidates:
        if (candidate / SPLITS[split][1]).is_dir() and (candidate / "mask").is_dir():
            return candidate
    raise FileNotFoundError(
        f"{root}: no {relative} folder with {SPLITS[split][1]}/ and mask/ (expected the P3M-10k release layout)"
    )


def open_dataset(split: str, *, data_dir=None, tfds_data_dir=None, tfds_config: str = "default"):
    """A random-access test split: from a release-layout folder (`data_dir`) or TFDS (`tfds_data_dir`)."""
    if (data_dir is None) == (tfds_data_dir is None):
        raise ValueError("give exactly one of data_dir (release folder) and tfds_data_dir")
    if data_dir is not None:
        return FolderDataset(data_dir, split)
    import tensorflow_datasets as tfds

    import tfds_p3m10k  # noqa: F401  (registers the builder)

    name, tfds_data_dir = f"p3m10k/{tfds_config}", os.fspath(tfds_data_dir)
    # Without this check TFDS would try to build the dataset here and fail on its manual download folder.
    builder = tfds.builder(name, data_dir=tfds_data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{name} is not built in {tfds_data_dir}: build it there with python -m "
            f"tfds_p3m10k.build --data_dir={tfds_data_dir} ... (tfds_p3m10k/README.md), or "
            f"evaluate the extracted P3M-10k release folder instead (--data_dir)"
        )
    return builder.as_data_source(split=split)


def _plain(example) -> dict:
    """A TFDS or folder example as numpy (H, W) maps and a str name."""
    squeeze = lambda x: np.asarray(x)[..., 0] if np.ndim(x) == 3 else np.asarray(x)  # noqa: E731
    name = example.get("name", "")
    name = name.decode() if isinstance(name, bytes) else str(name)
    out = {
        "name": name,
        "image": np.asarray(example["image"]),
        "alpha": squeeze(example["alpha"]),
        "trimap": squeeze(example["trimap"]),
    }
    has_facemask = bool(example.get("has_facemask", "facemask" in example))
    if has_facemask and "facemask" in example:
        facemask = squeeze(example["facemask"])
        if facemask.shape == out["alpha"].shape:
            out["facemask"] = facemask
    if out["image"].ndim == 2:
        out["image"] = np.repeat(out["image"][..., None], 3, axis=2)
    if out["image"].shape[:2] != out["alpha"].shape or out["trimap"].shape != out["alpha"].shape:
        raise ValueError(
            f"{name}: image {out['image'].shape}, alpha {out['alpha'].shape} and trimap "
            f"{out['trimap'].shape} differ in size"
        )
    return out


# ------------------------------------------------------------------------------------ compile accounting
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


def enable_compilation_cache(cache_dir=DEFAULT_CACHE_DIR) -> str:
    """Turns on JAX's persistent compilation cache in `cache_dir` (every compiled program is kept)."""
    import jax

    from jax.experimental.compilation_cache import compilation_cache

    cache_dir = os.fspath(cache_dir)
    if "://" not in cache_dir:  # JAX writes gs:// caches itself
        os.makedirs(cache_dir, exist_ok=True)
    if jax.config.jax_compilation_cache_dir not in (None, cache_dir):
        compilation_cache.reset_cache()  # JAX keeps using the first folder it opened otherwise
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir


# ---------------------------------------------------------------------------------------------- evaluate
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
        shape = inference.bucket_shape(height, width, metric_bucket)
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
      predictor: a `p3m_jax.predictor.Predictor` (anything with `forward`).
      dataset: examples with `image` (H, W, 3) uint8, `alpha` and `trimap` (H, W[, 1]) uint8, `name`, and
        optionally `facemask` / `has_facemask` (TFDS `p3m10k` examples or `FolderDataset` items).
      strategy: "hybrid" or "resize".
      mode: "exact" (every shape compiled as is) or "bucketed" (inputs padded, see the module docstring).
      save_png_dir: if given, the 8-bit predictions are written there as `<name>.png`.

    Returns:
      {"strategy", "mode", "count", "mean": {metric: dataset mean}, "per_image": [{"name", metrics...}],
       "network_shapes", "metric_shapes", "compiles", "cache_hits", "compile_seconds", "wall_seconds"}.
    """
    from tqdm import tqdm

    if mode not in ("exact", "bucketed"):
        raise ValueError(f"mode must be 'exact' or 'bucketed', got {mode!r}")
    if strategy.lower() not in inference.STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {inference.STRATEGIES}")
    runner = inference.NetworkRunner(predictor, bucket if mode == "bucketed" else None)
    metric_pad = metric_bucket if mode == "bucketed" else None
    total = len(dataset) if hasattr(dataset, "__len__") else None
    if limit is not None and total is not None:
        total = min(total, limit)
    per_image, metric_shapes = [], collections.Counter()
    start = time.perf_counter()
    with CompileCounter() as counter:
        iterator = (dataset[i] for i in range(total)) if total is not None else iter(dataset)
        for index, raw in enumerate(tqdm(iterator, total=total, disable=not progress, desc=f"eval {strategy}")):
            if limit is not None and index >= limit:
                break
            example = _plain(raw)
            pred_u8 = inference.quantize(inference.predict_alpha(runner, example["image"], strategy))
            if save_png_dir is not None:
                image_io.save_png(pathlib.Path(save_png_dir) / f"{example['name'] or index}.png", pred_u8)
            shape = example["alpha"].shape
            metric_shapes[inference.bucket_shape(*shape, metric_pad) if metric_pad else shape] += 1
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


def format_table(results: dict[str, dict]) -> str:
    """A markdown table of dataset means, one row per split."""
    present = {k for result in results.values() for k in result["mean"]}
    # The paper's order first (jitted dicts come back with sorted keys), anything else after.
    keys = [k for k in metrics.METRIC_KEYS + metrics.PRIVACY_KEYS if k in present]
    keys += sorted(present - set(keys))
    lines = ["| split | n | " + " | ".join(keys) + " |", "| --- | --- | " + " | ".join("---" for _ in keys) + " |"]
    for split, result in results.items():
        cells = [
            f"{result['mean'].get(k, math.nan):.4f}" if k.startswith("M") else f"{result['mean'].get(k, math.nan):.2f}"
            for k in keys
        ]
        lines.append(f"| {split} | {result['count']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path, payload) -> None:
    """Writes JSON atomically (temp file in the same folder, then rename)."""
    with atomic_write(path, "w") as handle:
        json.dump(payload, handle, indent=1, allow_nan=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m p3m_jax.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="p3m-jax checkpoint directory or authors' .pth")
    parser.add_argument("--arch", default=None, help="resnet34 | swin_t | vitae_s (required for a .pth)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_dir", help="folder in the P3M-10k release layout")
    source.add_argument("--tfds_data_dir", help="TFDS data_dir holding the built p3m10k dataset")
    parser.add_argument("--tfds_config", default="default", help="p3m10k builder config (default: default)")
    parser.add_argument("--split", default="p3m_500_p,p3m_500_np", help="comma-separated test splits")
    parser.add_argument("--strategy", default="hybrid", choices=inference.STRATEGIES)
    parser.add_argument("--mode", default="bucketed", choices=("bucketed", "exact"))
    parser.add_argument("--bucket", type=int, default=128, help="network input bucket (multiple of 32)")
    parser.add_argument("--metric_bucket", type=int, default=256, help="metric input bucket")
    parser.add_argument("--output", default="evaluation.json", help="JSON file for means and per-image scores")
    parser.add_argument("--save_png", default=None, help="folder for the 8-bit predictions (<split>/<name>.png)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images per split")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="compute dtype; bfloat16 is for GPUs/TPUs (parameters stay float32, outputs are float32)",
    )
    parser.add_argument("--cache_dir", default=DEFAULT_CACHE_DIR, help="JAX persistent compilation cache")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    enable_compilation_cache(args.cache_dir)
    from p3m_jax.predictor import CHECKPOINT_ERRORS, load_pretrained

    try:
        # The test sets first: a wrong folder is reported before the weights load and the programs compile.
        datasets = {
            split: open_dataset(
                split, data_dir=args.data_dir, tfds_data_dir=args.tfds_data_dir, tfds_config=args.tfds_config
            )
            for split in [s.strip() for s in args.split.split(",") if s.strip()]
        }
        predictor = load_pretrained(args.checkpoint, args.arch, dtype=args.dtype)
    except CHECKPOINT_ERRORS as error:  # and a missing input or data folder (FileNotFoundError too)
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = {}
    for split, dataset in datasets.items():
        save_dir = os.path.join(args.save_png, split) if args.save_png else None
        results[split] = evaluate(
            predictor,
            dataset,
            args.strategy,
            mode=args.mode,
            bucket=args.bucket,
            metric_bucket=args.metric_bucket,
            save_png_dir=save_dir,
            limit=args.limit,
        )
    print(f"{predictor.arch}, {args.strategy.upper()}, {args.mode}, {args.dtype}")
    print(format_table(results))
    write_json(
        args.output,
        {
            "checkpoint": os.fspath(args.checkpoint),
            "arch": predictor.arch,
            "strategy": args.strategy,
            "mode": args.mode,
            "dtype": args.dtype,
            "splits": results,
        },
    )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
