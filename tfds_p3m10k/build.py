"""Builds the p3m10k TFDS dataset (ArrayRecord, no TensorFlow needed).

  python -m tfds_p3m10k.build --release_dir=~/downloads/p3m --data_dir=~/tensorflow_datasets
  python -m tfds_p3m10k.build --tfds_config=estimate_fg_bg --release_dir=... --data_dir=... --num_workers=16
  python -m tfds_p3m10k.build --tfds_config=synthetic --data_dir=/tmp/tfds \\
      [--synthetic_image_size=256 --synthetic_num_train=500 --synthetic_num_test=50]
  python -m tfds_p3m10k.build --folder=~/my_portraits --name=mine --data_dir=~/tensorflow_datasets \\
      [--layout=folder|ppm100|aim500|p3m10k] [--split_fractions=train=0.9,test=0.1] \\
      [--anonymize=blur|mosaic|zero|none] [--anonymize_test=none] [--missing_face=stop|drop|keep] \\
      [--estimate_fg_bg] [--beam_options="--runner=DirectRunner --direct_num_workers=8"]

`--release_dir` holds the extracted `P3M-10k/` folder or the downloaded zip (TFDS's manual download folder;
see `Builder.MANUAL_DOWNLOAD_INSTRUCTIONS`); `--data_dir` is the TFDS data folder that training
(`config.data.data_dir`) and `python -m p3m_jax.evaluate --data_dir` read. Bad input stops the build before
anything is written and lists every offending file; `--skip_bad_examples` leaves those examples out
instead. Prints the split sizes and the build speed at the end.

A ``gs://`` `--data_dir` gets a build made in a local temporary folder (ArrayRecord writes local files)
and uploaded at the end, its metadata files last, so that a reader never sees a partial build.

`--folder` builds `portrait_folder/<name>` from a folder of your own portraits or a public benchmark
(`tfds_p3m10k/portrait_folder_builder.py`; layouts in `tfds_p3m10k/folder_layout.py`) and prints its
build report: examples per split, trimaps derived, faces found and anonymised, images without a face.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time

import tensorflow_datasets as tfds

from p3m_jax.common import cli, storage
from tfds_p3m10k import anonymize
from tfds_p3m10k import folder_layout
from tfds_p3m10k import release_layout
from tfds_p3m10k import p3m10k_dataset_builder as builder_lib
from tfds_p3m10k import portrait_folder_builder as folder_lib


def _scaffolding(data_dir: str, config_name: str, dataset_name: str = "p3m10k") -> list[str]:
    """The folders TFDS makes before a build reads its input, deepest first."""
    dataset = os.path.join(data_dir, dataset_name)
    downloads = os.path.join(data_dir, "downloads")
    return [
        os.path.join(dataset, config_name),
        os.path.join(dataset, ".config"),
        dataset,
        os.path.join(downloads, "extracted"),
        downloads,
        data_dir,
    ]


def _remove_scaffolding(new_folders: list[str]) -> None:
    """Removes the folders this build created, when a refused build left them empty (TFDS's
    `.config/metadata.json` aside): a refused build leaves nothing behind."""
    for folder in new_folders:  # deepest first
        metadata = os.path.join(folder, "metadata.json")
        if os.path.basename(folder) == ".config" and os.path.isfile(metadata):
            os.remove(metadata)
        try:
            os.rmdir(folder)
        except OSError:
            pass  # not empty, or already gone: left as it is


class _Destination:
    """Where a build goes: ``--data_dir`` itself, or for a bucket a local temporary folder whose build
    `publish` uploads."""

    def __init__(self, data_dir: str):
        self.remote = data_dir if storage.is_remote(data_dir) else None
        if self.remote:
            storage.check_bucket(self.remote, write=True)
        self.local = tempfile.mkdtemp(prefix="p3m_build_") if self.remote else os.path.expanduser(data_dir)

    def built_in_bucket(self, builder) -> bool:
        """Whether the bucket already holds this build (always False for a local --data_dir)."""
        return bool(self.remote) and (self._remote_version(builder) / "dataset_info.json").exists()

    def _remote_version(self, builder):
        relative = os.path.relpath(os.fspath(builder.data_dir), self.local).replace(os.sep, "/")
        return storage.resolve(self.remote) / relative

    def publish(self, builder) -> None:
        """Uploads the finished build to the bucket (replacing an older one there)."""
        if not self.remote:
            return
        target = self._remote_version(builder)
        if target.exists():
            target.rmtree()
        count = storage.upload_tfds_build(self.local, builder.data_dir, self.remote)
        print(f"  uploaded {count} files to {target}")

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser("python -m tfds_p3m10k.build", __doc__)
    parser.add_argument("--data_dir", required=True, help="TFDS data folder to write into.")
    parser.add_argument("--release_dir", help="Folder with P3M-10k/ or its zip (not for synthetic).")
    parser.add_argument(
        "--tfds_config",
        default="default",
        choices=[c.name for c in builder_lib.Builder.BUILDER_CONFIGS],
        help="Which p3m10k build (the release, with fg/bg estimated, or the synthetic stand-in).",
    )
    parser.add_argument(
        "--skip_bad_examples", action="store_true", help="Leave out examples with bad files instead of stopping."
    )
    parser.add_argument(
        "--num_workers",
        type=int,
        default=None,
        help="Processes for file checks and fg/bg estimation (unset: the CPU count).",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Rebuild even if the dataset exists (replaced only on success)."
    )
    parser.add_argument(
        "--synthetic_image_size",
        type=cli.image_size,
        default=None,
        help="SIZE or HEIGHTxWIDTH of synthetic images (unset: 128).",
    )
    parser.add_argument("--synthetic_num_train", type=int, default=None, help="Synthetic train examples (unset: 48).")
    parser.add_argument(
        "--synthetic_num_test", type=int, default=None, help="Synthetic examples per test split (unset: 8)."
    )
    folder = parser.add_argument_group("a folder of your own portraits or a benchmark (portrait_folder/<name>)")
    folder.add_argument("--folder", help="Folder to build from (instead of --release_dir / --tfds_config).")
    folder.add_argument("--name", help="Name of the build, read back as portrait_folder/<name>.")
    folder.add_argument(
        "--layout", default="folder", choices=sorted(folder_layout.LAYOUTS), help="The folder's layout."
    )
    folder.add_argument(
        "--split_fractions",
        default="train=0.9,test=0.1",
        help="How a folder without train/ test/ subfolders is split (by a stable hash of each name).",
    )
    folder.add_argument(
        "--anonymize", default="none", choices=anonymize.METHODS, help="Face obfuscation of train and validation."
    )
    folder.add_argument("--anonymize_test", default="none", choices=anonymize.METHODS, help="Face obfuscation of test.")
    folder.add_argument(
        "--missing_face",
        default="stop",
        choices=folder_lib.MISSING_FACE,
        help="An image to anonymise without a face found: stop the build, drop it, or keep it as it is.",
    )
    folder.add_argument(
        "--estimate_fg_bg", action="store_true", help="Estimate train fg/bg with pymatting (the composition loss)."
    )
    folder.add_argument(
        "--beam_options",
        default=None,
        help="Encode on Apache Beam with these pipeline options, e.g. '--runner=DirectRunner "
        "--direct_num_workers=8 --direct_running_mode=multi_processing' (pip install 'p3m-jax[beam]').",
    )
    return parser.parse_args(argv)


def build_folder(args: argparse.Namespace, destination: _Destination) -> int:
    """Builds portrait_folder/<name> from --folder; prints the build report."""
    name = args.name or os.path.basename(os.path.normpath(os.path.expanduser(args.folder)))
    try:
        config = folder_lib.folder_config(
            name,
            args.folder,
            layout=args.layout,
            split_fractions=args.split_fractions,
            anonymize=args.anonymize,
            anonymize_test=args.anonymize_test,
            missing_face=args.missing_face,
            estimate_fg_bg=args.estimate_fg_bg,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data_dir = destination.local
    builder = folder_lib.PortraitFolder(
        data_dir=data_dir, config=config, num_workers=args.num_workers, use_beam=args.beam_options is not None
    )
    beam_options = None
    if args.beam_options is not None:
        try:
            from apache_beam.options.pipeline_options import PipelineOptions  # optional extra
        except ImportError:
            print("error: --beam_options needs Apache Beam: pip install 'p3m-jax[beam]'", file=sys.stderr)
            return 2
        beam_options = PipelineOptions(args.beam_options.split())
    if (builder.is_prepared() or destination.built_in_bucket(builder)) and not args.overwrite:
        where = destination.remote or builder.data_dir
        print(f"{folder_lib.DATASET_NAME}/{name} in {where}: already built, reused (--overwrite rebuilds)")
        return 0
    new_folders = [p for p in _scaffolding(data_dir, name, folder_lib.DATASET_NAME) if not os.path.exists(p)]
    start = time.time()
    download_config = tfds.download.DownloadConfig(
        beam_options=beam_options,
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
        download_mode=tfds.download.GenerateMode.FORCE_REDOWNLOAD
        if args.overwrite
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
    )
    try:
        with cli.without_tfds_banner():
            builder.download_and_prepare(download_config=download_config)
    except (release_layout.BadInputError, FileNotFoundError) as e:
        _remove_scaffolding(new_folders)
        print(f"error: {e}", file=sys.stderr)
        return 1
    elapsed = time.time() - start
    total = sum(builder.report.examples.values())
    print(f"{folder_lib.DATASET_NAME}/{name} in {destination.remote or builder.data_dir}")
    for line in builder.report.lines():
        print("  " + line)
    print(f"  {total} examples in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.1f} examples/s)")
    destination.publish(builder)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with cli.routine_logs_quiet():  # the libraries' routine lines, for this command's work only
        return _run(args)


def _run(args) -> int:
    if not sys.stderr.isatty():
        tfds.disable_progress_bar()  # its bars would leave cursor-control codes in a redirected log
    try:
        destination = _Destination(args.data_dir)
    except (storage.StorageError, ValueError) as e:
        print(f"error: --data_dir {e}", file=sys.stderr)
        return 2
    try:
        with contextlib.ExitStack() as stack:
            # A gs:// source folder (or release zip's folder) is read from a local copy.
            if args.folder and storage.is_remote(args.folder):
                args.name = args.name or os.path.basename(args.folder.rstrip("/"))
                args.folder = stack.enter_context(storage.local_copy(args.folder))
            if args.release_dir and storage.is_remote(args.release_dir):
                args.release_dir = stack.enter_context(storage.local_copy(args.release_dir))
            return build_folder(args, destination) if args.folder else build_release(args, destination)
    except (storage.StorageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destination.close()


def build_release(args: argparse.Namespace, destination: _Destination) -> int:
    """Builds p3m10k/<config> from --release_dir, or the synthetic stand-in; prints the split sizes."""
    is_synthetic = args.tfds_config == "synthetic"
    if not is_synthetic and not args.release_dir:
        print(f"error: --release_dir is required for --tfds_config={args.tfds_config}", file=sys.stderr)
        return 2
    if not is_synthetic and any(
        v is not None for v in (args.synthetic_image_size, args.synthetic_num_train, args.synthetic_num_test)
    ):
        print("error: --synthetic_* flags need --tfds_config=synthetic", file=sys.stderr)
        return 2

    builder = builder_lib.Builder(
        data_dir=destination.local,
        config=args.tfds_config,
        skip_bad_examples=args.skip_bad_examples,
        num_workers=args.num_workers,
        synthetic_image_size=args.synthetic_image_size,
        synthetic_num_train=args.synthetic_num_train,
        synthetic_num_test=args.synthetic_num_test,
    )
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(args.release_dir) if args.release_dir else None,
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
        download_mode=(
            tfds.download.GenerateMode.FORCE_REDOWNLOAD
            if args.overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
        ),
    )
    if destination.built_in_bucket(builder) and not args.overwrite:
        print(
            f"p3m10k/{builder.builder_config.name} in {destination.remote}: already built, reused (--overwrite rebuilds)"
        )
        return 0
    reused = builder.is_prepared() and not args.overwrite
    scaffolding = _scaffolding(destination.local, builder.builder_config.name)
    new_folders = [path for path in scaffolding if not os.path.exists(path)]
    start = time.time()
    try:
        with cli.without_tfds_banner():
            builder.download_and_prepare(download_config=download_config)
    except release_layout.BadInputError as e:
        _remove_scaffolding(new_folders)
        print(f"error: {e}", file=sys.stderr)
        return 1
    elapsed = time.time() - start
    sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
    total = sum(sizes.values())
    print(f"p3m10k/{builder.builder_config.name} in {destination.remote or builder.data_dir}")
    print("  " + ", ".join(f"{name}: {count}" for name, count in sizes.items()))
    for split, names in getattr(builder, "skipped_examples", {}).items():
        if names:
            print(f"  skipped in {split}: {len(names)} ({', '.join(names[:10])}{' ...' if len(names) > 10 else ''})")
    if reused:
        print(f"  {total} examples: already built, reused (--overwrite rebuilds)")
    else:
        print(f"  {total} examples in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.1f} examples/s)")
    destination.publish(builder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
