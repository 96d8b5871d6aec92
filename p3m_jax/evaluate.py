"""Evaluation on P3M-500-P / P3M-500-NP with the paper's RESIZE and HYBRID strategies.

    python -m p3m_jax.evaluate --checkpoint CKPT [--arch resnet34] --release_dir /data/P3M-10k \\
        [--split p3m_500_p,p3m_500_np] [--strategy hybrid|resize] [--mode bucketed|exact] \\
        [--output DIR [--save_png]] [--limit N]
    python -m p3m_jax.evaluate --checkpoint CKPT --data_dir ~/tensorflow_datasets --tfds_config default ...
    python -m p3m_jax.evaluate --checkpoint CKPT --data_dir ~/data/PPM-100 --layout ppm100 ...
    python -m p3m_jax.evaluate --checkpoint CKPT --data_dir ~/tensorflow_datasets --tfds_config portrait_folder/mine

Data comes from a folder in the release layout (`--release_dir`: the folder holding `P3M-10k/`,
`P3M-10k/` itself, or its `validation/`) or from a TFDS build of `p3m10k` in a TFDS data folder
(`--data_dir` and `--tfds_config`, which may also name a folder build, `portrait_folder/<name>`), opened as
the training loop opens it (`p3m_jax.data.evaluation_data`). With `--layout`, `--data_dir` is a folder in
that layout (`ppm100`, `aim500`, `folder`: your own `images/` + `alphas/`, `p3m10k`: the release), scored
as it is; where it has no trimaps they are derived from the alpha and the table says how many.
Without `--split`, every test split of the data is scored.
The table of means is printed; `--output DIR` also writes `DIR/evaluation.json` (means and per-image
scores) and, with `--save_png`, the 8-bit predictions as `DIR/<split>/<name>.png`.
Scoring and the `exact` / `bucketed` modes: `p3m_jax.evaluation.scoring`. Compiled programs are kept in
JAX's persistent compilation cache (`--cache_dir`).

The test sets and the output folder are checked before the weights load: a wrong folder, an unbuilt TFDS
dataset, an unwritable `--output` or a missing or unreadable checkpoint stops it at once with one `error:`
line and exit status 2.
"""

from __future__ import annotations

import contextlib
import os
import sys

import ml_collections

from p3m_jax.common import cli, fileio, storage
from p3m_jax.common.compilation_cache import enable_for_command
from p3m_jax.data.evaluation_data import FOLDER_FRACTIONS, layout_test_splits, open_test_split, test_splits
from p3m_jax.data.raw_records import TEST_SPLITS
from p3m_jax.evaluation.report import format_table, write_json
from p3m_jax.evaluation.scoring import evaluate
from p3m_jax.inference import strategies
from p3m_jax.inference.loading import CHECKPOINT_ERRORS, load_pretrained
from p3m_jax.models import ARCHITECTURES
from tfds_p3m10k import folder_layout

RESULTS_FILE = "evaluation.json"


def parse_args(argv=None):
    parser = cli.ArgumentParser("python -m p3m_jax.evaluate", __doc__)
    parser.add_argument("--checkpoint", required=True, help="p3m-jax checkpoint, training workdir or authors' .pth")
    parser.add_argument("--arch", default=None, choices=sorted(ARCHITECTURES), help="required for a .pth")
    cli.add_ema_argument(parser)
    parser.add_argument("--release_dir", help="folder in the P3M-10k release layout")
    parser.add_argument("--data_dir", help="TFDS data folder holding a p3m10k build")
    parser.add_argument(
        "--tfds_config", default="default", help="p3m10k build config in --data_dir, or portrait_folder/<name>"
    )
    parser.add_argument(
        "--layout",
        default=None,
        choices=sorted(folder_layout.LAYOUTS),
        help="--data_dir is a folder in this layout (scored without building it)",
    )
    parser.add_argument("--split", default=None, help="comma-separated test splits (unset: all of the data's)")
    parser.add_argument(
        "--strategy", default="hybrid", choices=strategies.STRATEGIES, help="the paper's inference strategy"
    )
    parser.add_argument(
        "--mode",
        default="bucketed",
        choices=("bucketed", "exact"),
        help="pad inputs to buckets, or run each at its size",
    )
    parser.add_argument("--bucket", type=int, default=strategies.BUCKET, help="network input bucket (multiple of 32)")
    parser.add_argument("--metric_bucket", type=int, default=256, help="metric input bucket")
    parser.add_argument("--output", default=None, help=f"folder for {RESULTS_FILE} (and the PNGs of --save_png)")
    parser.add_argument(
        "--save_png", action="store_true", help="also write the 8-bit predictions to <output>/<split>/<name>.png"
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images per split")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="compute dtype; bfloat16 is for GPUs/TPUs (parameters stay float32, outputs are float32)",
    )
    cli.add_cache_dir_argument(parser)
    args = parser.parse_args(argv)
    args.results_path = os.path.join(args.output, RESULTS_FILE) if args.output else None
    args.png_dir = args.output if args.save_png else None
    if (args.release_dir is None) == (args.data_dir is None):
        parser.error("give one of --release_dir (a release-layout folder) and --data_dir (a TFDS data folder)")
    if args.layout is not None and args.data_dir is None:
        parser.error("--layout reads the folder given as --data_dir")
    if args.save_png and args.output is None:
        parser.error("--save_png writes into --output: give --output DIR")
    return args


def _default_splits(args) -> list[str]:
    """Every test split of the data: the layout's that the folder has, or the build's."""
    if args.release_dir is not None or args.layout is not None:
        layout = args.layout or "p3m10k"
        folder = args.data_dir if args.layout is not None else args.release_dir
        try:
            present = folder_layout.present_splits(folder, layout, FOLDER_FRACTIONS)
        except folder_layout.LayoutNotFoundError as error:
            raise FileNotFoundError(str(error)) from None
        # None of them: all, so that opening them says what is missing.
        return [split for split in layout_test_splits(layout) if split in present] or layout_test_splits(layout)
    if "/" not in args.tfds_config:
        return list(TEST_SPLITS)
    return test_splits(ml_collections.ConfigDict({"data_dir": args.data_dir, "tfds_name": args.tfds_config}))


def main(argv=None) -> int:
    args = parse_args(argv)
    with cli.routine_logs_quiet():  # the libraries' routine lines, for this command's work only
        return _run(args)


def _run(args) -> int:
    enable_for_command(args.cache_dir)
    try:
        with contextlib.ExitStack() as stack:
            # A gs:// folder in a layout (a benchmark, the release) is read from a local copy; a gs:// TFDS
            # data folder is read in place.
            if args.release_dir and storage.is_remote(args.release_dir):
                args.release_dir = stack.enter_context(storage.local_copy(args.release_dir))
            if args.layout is not None and args.data_dir and storage.is_remote(args.data_dir):
                args.data_dir = stack.enter_context(storage.local_copy(args.data_dir))
            return _evaluate(args)
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _evaluate(args) -> int:
    created = False
    if args.layout is not None:
        source = {"folder": args.data_dir, "layout": args.layout}
    else:
        source = {"release_dir": args.release_dir, "tfds_data_dir": args.data_dir, "tfds_config": args.tfds_config}
    try:
        default_splits = _default_splits(args)
        # The test sets and the output folder first: a wrong folder is reported before the weights load
        # and the programs compile.
        datasets = {
            split: open_test_split(split, **source)
            for split in ([s.strip() for s in args.split.split(",") if s.strip()] if args.split else default_splits)
        }
        created = fileio.prepare_output(args.output) if args.output else False
        predictor = load_pretrained(args.checkpoint, args.arch, dtype=args.dtype, ema=args.ema)
    # A missing or bad data folder or checkpoint, an unwritable output:
    except (*CHECKPOINT_ERRORS, OSError, folder_layout.BadInputError) as error:
        if args.output:
            fileio.remove_if_empty(args.output, created)
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"loaded {predictor.describe()}")
    results = {}
    for split, dataset in datasets.items():
        save_dir = os.path.join(args.png_dir, split) if args.png_dir else None
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
    for split, dataset in datasets.items():
        derived = getattr(dataset, "trimaps_derived", 0)
        if derived:
            results[split]["trimaps_derived"] = derived
            print(f"{split}: {derived} trimap(s) derived from the alpha (the folder has none)")
    if args.results_path:
        write_json(
            args.results_path,
            {
                "checkpoint": os.fspath(args.checkpoint),
                "arch": predictor.arch,
                "strategy": args.strategy,
                "mode": args.mode,
                "dtype": args.dtype,
                "splits": results,
            },
        )
        print(f"wrote {args.results_path}" + (f" and the PNGs in {args.png_dir}" if args.png_dir else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
