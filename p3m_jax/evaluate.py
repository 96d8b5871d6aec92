"""Evaluation on P3M-500-P / P3M-500-NP with the paper's RESIZE and HYBRID strategies.

    python -m p3m_jax.evaluate --checkpoint CKPT [--arch resnet34] --data_dir /data/P3M-10k \
        [--split p3m_500_p,p3m_500_np] [--strategy hybrid|resize] [--mode bucketed|exact] \
        [--output results.json] [--save_png DIR] [--limit N]
    python -m p3m_jax.evaluate --checkpoint CKPT --tfds_data_dir ~/tensorflow_datasets --tfds_config default ...

Data comes from a folder in the release layout (docs/design.md section 2; `--data_dir` may be the folder holding
`P3M-10k/`, `P3M-10k/` itself, or its `validation/`) or from a TFDS build of `p3m10k`
(`--tfds_data_dir`), opened as the training loop opens it (`p3m_jax.data.evaluation_data`).
Scoring and the `exact` / `bucketed` modes: `p3m_jax.evaluation.scoring`. Compiled programs are kept in
JAX's persistent compilation cache (`--cache_dir`).

The test sets are found before the weights load: a wrong folder, an unbuilt TFDS dataset or a missing or
unreadable checkpoint stops it at once with one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from p3m_jax.common.compilation_cache import DEFAULT_CACHE_DIR, enable_compilation_cache
from p3m_jax.data.evaluation_data import open_test_split
from p3m_jax.evaluation.report import format_table, write_json
from p3m_jax.evaluation.scoring import evaluate
from p3m_jax.inference import strategies
from p3m_jax.inference.loading import CHECKPOINT_ERRORS, load_pretrained


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
    parser.add_argument("--strategy", default="hybrid", choices=strategies.STRATEGIES)
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

    try:
        # The test sets first: a wrong folder is reported before the weights load and the programs compile.
        datasets = {
            split: open_test_split(
                split, release_dir=args.data_dir, tfds_data_dir=args.tfds_data_dir, tfds_config=args.tfds_config
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
