"""Evaluation throughput (images/s) per variant and dtype on synthetic portraits, and bfloat16's metric change.

    python benchmarks/bench_eval_throughput.py [--arch resnet34 swin_t vitae_s] [--dtype float32 bfloat16] \
        [--images 32] [--height 512 --width 512] [--strategy hybrid] [--bucket 128] [--output DIR]

Renders `--images` synthetic portraits (`tfds_p3m10k.synthetic`, the renderer behind the `p3m10k/synthetic`
TFDS config) and runs `p3m_jax.evaluation.scoring.evaluate` on them twice per (arch, dtype) with random weights: the first
pass includes compiling the network and metric programs, the second (after every first pass) is the steady state,
reported as images/s (the whole `evaluate` loop: host resizing, the network, the jitted metrics). For every dtype
after the first, the dataset means are compared with the first dtype's (the metric change of bfloat16 against
float32; with random weights this shows the numerical drift, not a trained model's accuracy).
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from p3m_jax.common import cli  # noqa: E402


MAIN_METRICS = ("SAD", "MSE", "MAD", "GRAD", "CONN")


def synthetic_split(count: int, height: int, width: int, seed: int = 0) -> list[dict]:
    """`count` rendered portraits in the evaluation example layout."""
    from bench_eval_compile import portrait_example  # this folder's script, the same example layout

    return [portrait_example(seed + i, height, width, f"synthetic_{i:03d}") for i in range(count)]


def main(argv=None) -> int:
    parser = cli.ArgumentParser("python benchmarks/bench_eval_throughput.py", __doc__)
    parser.add_argument("--arch", nargs="+", default=["resnet34", "swin_t", "vitae_s"])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--strategy", default="hybrid", choices=["hybrid", "resize"])
    parser.add_argument("--bucket", type=int, default=128)
    parser.add_argument("--output", default="", help="also write the rows to <output>/bench_eval_throughput.json")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be at least 1")

    import jax
    import jax.numpy as jnp

    from p3m_jax.evaluation import scoring
    from device_turns import end_device_turn, wait_for_device_turn
    from p3m_jax.inference.predictor import Predictor

    jax.config.update("jax_enable_compilation_cache", False)  # the first pass is a cold start
    device = jax.devices()[0]
    examples = synthetic_split(args.images, args.height, args.width)
    print(
        f"# {device.platform} {device.device_kind}; {args.images} synthetic portraits {args.height}x{args.width}, "
        f"{args.strategy.upper()}, bucket {args.bucket}, random weights",
        flush=True,
    )
    print(
        "arch | dtype | first pass | steady pass | images/s (steady) | "
        + " | ".join(("SAD", "MSE", "change vs " + args.dtype[0])),
        flush=True,
    )
    # Every first pass (compilation included) runs before any steady pass, so that under
    # benchmarks/device_suite.py the steady passes run alone on the device (`wait_for_device_turn`).
    runs = []
    for arch in args.arch:
        for dtype_name in args.dtype:
            predictor = Predictor.random(arch, dtype=jnp.dtype(dtype_name))
            start = time.perf_counter()
            scoring.evaluate(predictor, examples, args.strategy, bucket=args.bucket, progress=False)
            runs.append((arch, dtype_name, predictor, time.perf_counter() - start))
    wait_for_device_turn()
    rows, references = [], {}
    for arch, dtype_name, predictor, first_s in runs:
        start = time.perf_counter()
        result = scoring.evaluate(predictor, examples, args.strategy, bucket=args.bucket, progress=False)
        steady_s = time.perf_counter() - start
        mean = result["mean"]
        row = {
            "arch": arch,
            "dtype": dtype_name,
            "device_kind": device.device_kind,
            "images": args.images,
            "first_s": first_s,
            "steady_s": steady_s,
            "images_per_s": args.images / steady_s,
            "mean": mean,
        }
        reference = references.setdefault(arch, mean)
        if reference is mean:
            change = "-"
        else:
            row["relative_change"] = {k: abs(mean[k] - v) / max(abs(v), 1e-12) for k, v in reference.items()}
            change = ", ".join(f"{k} {row['relative_change'][k]:.1e}" for k in MAIN_METRICS)
        rows.append(row)
        print(
            f"{arch} | {dtype_name} | {first_s:.2f}s | {steady_s:.2f}s | {row['images_per_s']:.2f} | "
            f"{mean['SAD']:.4g} | {mean['MSE']:.4g} | {change}",
            flush=True,
        )
    end_device_turn()
    if args.output:
        pathlib.Path(args.output).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(args.output) / "bench_eval_throughput.json").write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
