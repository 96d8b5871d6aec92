"""Compilations and wall time of evaluation over many image sizes: exact shapes vs bucketed.

    python benchmarks/bench_eval_compile.py [--images 50] [--sizes 20] [--strategy resize] [--arch resnet34]
        [--bucket 128] [--metric_bucket 256] [--cache_dir DIR]

Renders synthetic portraits (tfds_p3m10k.synthetic) of `--sizes` different sizes between 96 and 288 px,
`--images` in all, and evaluates a random-weight model on them twice in fresh processes' worth of state:
`exact` (one compilation per distinct shape) and `bucketed`. Prints compile counts, compile seconds, wall time,
and how far the bucketed metrics move from the exact ones (largest relative change of a dataset mean, and the
largest per-image absolute change per metric). With `--cache_dir`, a second run of this script shows the
persistent compilation cache at work (cache hits instead of compilations).
"""

from __future__ import annotations

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from p3m_jax.common import cli  # noqa: E402

import numpy as np  # noqa: E402


def synthetic_examples(count: int, n_sizes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sizes = sorted({(int(h), int(w)) for h, w in rng.integers(96, 289, (n_sizes * 4, 2))})
    sizes = [sizes[i] for i in rng.choice(len(sizes), n_sizes, replace=False)]
    examples = []
    for i in range(count):
        height, width = sizes[i % n_sizes]
        examples.append(portrait_example(seed + i, height, width, f"synthetic_{i:03d}_{height}x{width}"))
    return examples, sizes


def portrait_example(seed: int, height: int, width: int, name: str) -> dict:
    """One rendered synthetic portrait in the layout `p3m_jax.evaluation.scoring.evaluate` reads."""
    from tfds_p3m10k import synthetic

    portrait = synthetic.render_portrait(seed, height, width)
    return {
        "name": name,
        "image": portrait.image,
        "alpha": portrait.alpha,
        "trimap": portrait.trimap,
        "facemask": portrait.facemask,
        "has_facemask": True,
    }


def main():
    parser = cli.ArgumentParser("python benchmarks/bench_eval_compile.py", __doc__)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--sizes", type=int, default=20)
    parser.add_argument("--strategy", default="resize", choices=("resize", "hybrid"))
    parser.add_argument("--arch", default="resnet34")
    parser.add_argument("--bucket", type=int, default=128)
    parser.add_argument("--metric_bucket", type=int, default=256)
    parser.add_argument("--cache_dir", default=None, help="enable JAX's persistent compilation cache here")
    args = parser.parse_args()

    from p3m_jax.common import compilation_cache
    from p3m_jax.evaluation import scoring
    from p3m_jax.inference.predictor import Predictor

    if args.cache_dir:
        compilation_cache.enable_compilation_cache(args.cache_dir)
    examples, sizes = synthetic_examples(args.images, args.sizes)
    predictor = Predictor.random(args.arch, seed=0)
    results = {}
    for mode in ("bucketed", "exact"):
        start = time.perf_counter()
        results[mode] = scoring.evaluate(
            predictor,
            examples,
            args.strategy,
            mode=mode,
            bucket=args.bucket,
            metric_bucket=args.metric_bucket,
            progress=False,
        )
        results[mode]["total"] = time.perf_counter() - start
    print(
        f"{args.images} synthetic images, {len(sizes)} sizes, {args.arch} (random weights), "
        f"{args.strategy.upper()}, cache {'on: ' + args.cache_dir if args.cache_dir else 'off'}"
    )
    print("| mode | network shapes | metric shapes | XLA compiles | cache hits | compile s | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, r in results.items():
        print(
            f"| {mode} | {r['network_shapes']} | {r['metric_shapes']} | {r['compiles']} | {r['cache_hits']} | "
            f"{r['compile_seconds']:.1f} | {r['total']:.1f} |"
        )
    exact, bucketed = results["exact"], results["bucketed"]
    print("| metric | exact mean | bucketed mean | relative change | max per-image abs change |")
    print("| --- | --- | --- | --- | --- |")
    worst = 0.0
    for key, value in exact["mean"].items():
        other = bucketed["mean"][key]
        relative = abs(other - value) / max(abs(value), 1e-12)
        per_image = max(abs(a[key] - b[key]) for a, b in zip(exact["per_image"], bucketed["per_image"]))
        worst = max(worst, relative)
        print(f"| {key} | {value:.5g} | {other:.5g} | {relative:.2e} | {per_image:.3g} |")
    print(f"largest relative change of a dataset mean: {worst:.2e}")


if __name__ == "__main__":
    main()
