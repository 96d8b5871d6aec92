"""Input pipeline throughput: examples/s for 0 (in-process), 1, 2 and N grain worker processes, and ms per stage.

    python benchmarks/bench_input.py [--workers 1,2,4] [--seconds 10] \
        [--sample_dir DIR] [--skip_synthetic]

Two datasets, both built into a temporary TFDS data_dir (never into the repo):
  * synthetic: the quickstart's config (the default recipe's data group, its own small sizes);
  * sample: a TFDS build (`python -m tfds_p3m10k.build`) of a release-layout folder, read with the paper's
    settings (512 output, crops 512/768/1024, trimap kernel 15-30); the train split is looped over.
Per-stage times come from running the transform in this process on the raw records (one core), with
each of its steps (decoding, crop sampling, warping, the trimap) wrapped in a timer; throughput from `p3m_jax.data.create_host_iterator` (host batches, no devices), after a warm-up.
"""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p3m_jax.common import cli  # noqa: E402


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# The functions the training transform calls for its stages, wrapped with a timer by `stage_times`.
_STAGES = {
    "decoding": ("decode_grey", "decode_bgr"),
    "transforms": ("sample_crop", "warp_crop", "elliptical_trimap", "quantise_trimap"),
}


def _timed(function, name: str, timings: dict, open_calls: list):
    """``function`` adding its own time to ``timings[name]``: the time of timed calls it makes
    (``sample_crop`` computes a trimap) goes to theirs, so the stages add up to the total."""

    def timed(*args, **kwargs):
        open_calls.append(0.0)  # seconds spent in timed calls made by this one
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            inner = open_calls.pop()
            timings[name] = timings.get(name, 0.0) + elapsed - inner
            if open_calls:
                open_calls[-1] += elapsed

    return timed


def stage_times(config, n: int = 40) -> tuple[dict, float, float]:
    """Mean wall ms per stage over `n` examples in this process (one thread), examples/s by wall time and
    by this process's CPU time (the latter is what one idle core would give, on a busy shared machine)."""
    import cv2
    import numpy as np

    from p3m_jax.data import decoding, raw_records, transforms

    cv2.setNumThreads(1)
    split = raw_records.open_split(config, "train")
    raw_source = raw_records.RawSource(split)
    transform = transforms.TrainTransform.from_config(config)
    rng = np.random.default_rng(0)
    timings: dict[str, float] = {}
    open_calls: list[float] = []
    modules = {"decoding": decoding, "transforms": transforms}
    originals = {(m, f): getattr(modules[m], f) for m, names in _STAGES.items() for f in names}
    for (module, name), function in originals.items():
        setattr(modules[module], name, _timed(function, name, timings, open_calls))
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        for i in range(n):
            t0 = time.perf_counter()
            raw = raw_source[i % len(raw_source)]
            timings["read"] = timings.get("read", 0.0) + time.perf_counter() - t0
            transform.apply(raw, rng)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        for (module, name), function in originals.items():
            setattr(modules[module], name, function)
    return {k: 1000 * v / n for k, v in timings.items()}, n / elapsed, n / cpu


def throughput(config, workers: int, seconds: float, batch_size: int) -> float:
    """Examples/s of the host pipeline with `workers` grain processes (0 = in this process)."""
    from p3m_jax import data

    it = data.create_host_iterator(
        config, seed=0, batch_size=batch_size, process_index=0, process_count=1, num_workers=workers
    )
    for _ in range(max(2, 2 * workers)):  # warm-up: worker start, first batches
        next(it)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        count += batch_size
    rate = count / (time.perf_counter() - start)
    it.close()
    return rate


def build_sample(sample_dir: str, data_dir: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "tfds_p3m10k.build", f"--release_dir={sample_dir}", f"--data_dir={data_dir}"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )


def main() -> int:
    parser = cli.ArgumentParser("python benchmarks/bench_input.py", __doc__)
    parser.add_argument("--workers", default=f"1,2,{os.cpu_count()}", help="comma-separated worker counts")
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement time per worker count")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--sample_dir", default=None, help="a folder in the release layout (P3M-10k/...)")
    parser.add_argument("--skip_synthetic", action="store_true")
    parser.add_argument("--no_reduced_dct", action="store_true", help="decode JPEGs at full scale")
    args = parser.parse_args()

    import logging

    from absl import flags

    flags.FLAGS.mark_as_parsed()
    logging.getLogger("absl").setLevel(logging.ERROR)
    from p3m_jax.configs import default
    from p3m_jax.data import builds, decoding, holdout, raw_records

    worker_counts = sorted({int(w) for w in args.workers.split(",")})
    print(f"machine: {os.cpu_count()} CPUs, {_cpu_model()}, python {platform.python_version()}")
    tmp = tempfile.mkdtemp(prefix="bench_input_")
    holdout.NAMES_CACHE_DIR = os.path.join(tmp, "names")
    datasets = []
    if not args.skip_synthetic:
        config = default.get_config().data
        config.data_dir = os.path.join(tmp, "synthetic")
        builds.ensure_dataset(config, process_index=0)
        datasets.append(("synthetic " + config.tfds_name.split("/")[1], config))
    if args.sample_dir and os.path.isdir(args.sample_dir):
        data_dir = os.path.join(tmp, "sample")
        build_sample(args.sample_dir, data_dir)
        config = default.get_config().data
        config.update(
            dict(
                tfds_name="p3m10k/default",
                data_dir=data_dir,
                build_synthetic=False,
                image_size=512,
                crop_sizes=(512, 768, 1024),
                trimap_kernel_range=(15, 30),
                validation_count=0,
                reduced_dct_decode=not args.no_reduced_dct,
            )
        )
        datasets.append(("sample (release JPEGs, paper settings)", config))

    for label, config in datasets:
        split = raw_records.open_split(config, "train")
        first = decoding.decode_grey(raw_records.RawSource(split)[0]["alpha"])
        print(
            f"\n== {label}: {len(split)} train examples, first {first.shape[0]}x{first.shape[1]}, "
            f"output {config.image_size}, crops {tuple(config.crop_sizes)}, kernel "
            f"{tuple(config.trimap_kernel_range)}, reduced DCT {config.reduced_dct_decode}"
        )
        stages, rate, cpu_rate = stage_times(config)
        total = sum(stages.values())
        print(
            "per-stage ms (1 core, in-process): "
            + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
            + f"; total {total:.2f} ms -> {rate:.1f} examples/s ({cpu_rate:.1f} per CPU-second)"
        )
        print(f"{'workers':>8} {'examples/s':>11} {'per worker':>11} {'vs linear':>10}")
        base = None
        for workers in [0] + [w for w in worker_counts if w > 0]:
            value = throughput(config, workers, args.seconds, args.batch_size)
            if workers == 1:
                base = value
            per = value / max(workers, 1)
            linear = f"{100 * value / (base * workers):.0f}%" if base and workers >= 1 else "-"
            print(f"{workers if workers else '0 (main)':>8} {value:11.1f} {per:11.1f} {linear:>10}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
