"""Which TFDS build a config names, and making one on first use: the builder lookup for `p3m10k/<config>`
and `portrait_folder/<name>` in a data folder (local or gs://), the configs built there, and the on-demand
build of the synthetic stand-in (process 0 builds, the others wait)."""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time

from p3m_jax.common import cli, storage

_log = logging.getLogger(__name__)

_SYNTHETIC_NAME = re.compile(r"^synthetic(?:_(\d+)x(\d+)_(\d+)_(\d+)_(\d+)(?:_seed(\d+))?)?$")
DATASETS = ("p3m10k", "portrait_folder")  # the builders of tfds_p3m10k; the same features


def _split_tfds_name(tfds_name: str) -> tuple[str, str]:
    dataset, _, config = tfds_name.partition("/")
    if dataset not in DATASETS:
        raise ValueError(
            f"config.data.tfds_name must be 'p3m10k/<config>' or 'portrait_folder/<name>', got {tfds_name!r}"
        )
    if dataset == "portrait_folder" and not config:
        raise ValueError(f"{tfds_name!r}: name the build, 'portrait_folder/<name>'")
    return dataset, config.split(":")[0] or "default"


def synthetic_builder_config(tfds_name: str):
    """The `tfds_p3m10k` synthetic builder config a name like 'p3m10k/synthetic_64x64_24_4_4' stands for.

    Returns None when the name is not a synthetic config.
    """
    from tfds_p3m10k import p3m10k_dataset_builder as builder_lib

    dataset, config = _split_tfds_name(tfds_name)
    if dataset != "p3m10k":
        return None
    match = _SYNTHETIC_NAME.match(config)
    if not match:
        return None
    if match.group(1) is None:
        return builder_lib.synthetic_config()
    height, width, num_train, num_test, num_test2, seed = match.groups()
    if num_test != num_test2:
        raise ValueError(f"{tfds_name!r}: synthetic configs have equal test split sizes")
    return builder_lib.synthetic_config(
        image_size=(int(height), int(width)),
        num_train=int(num_train),
        num_test=int(num_test),
        seed=int(seed or 0),
        name=config,
    )


class NotBuiltError(FileNotFoundError):
    """A `portrait_folder/<name>` that is not built in the data folder (only its build can make it)."""


def get_builder(data_config):
    """The TFDS builder for `data_config.tfds_name` in `data_config.data_dir` (not built here).

    A `portrait_folder/<name>` is read from its folder (NotBuiltError when it is not built there).
    Raises ValueError naming the known configs when the name is not one of them."""
    import tensorflow_datasets as tfds

    from tfds_p3m10k import p3m10k_dataset_builder as builder_lib

    data_dir = os.fspath(storage.resolve(data_config.data_dir))
    dataset, config = _split_tfds_name(data_config.tfds_name)
    if dataset == "portrait_folder":
        root = os.path.join(data_dir, dataset, config)
        versions = _built_versions(root)
        if not versions:
            built = built_configs(data_dir, dataset)
            raise NotBuiltError(
                f"{data_config.tfds_name} is not built in {data_config.data_dir} ("
                + (f"built there: {', '.join(built)}" if built else "no portrait_folder build there")
                + f"). Build it with: python -m tfds_p3m10k.build --folder=<your folder> --name={config} "
                f"--data_dir={data_config.data_dir}"
            )
        return tfds.builder_from_directory(os.path.join(root, versions[-1]))
    synthetic = synthetic_builder_config(data_config.tfds_name)
    if synthetic is not None:
        return builder_lib.Builder(config=synthetic, data_dir=data_dir)
    try:
        return tfds.builder(data_config.tfds_name, data_dir=data_dir)
    except (ValueError, KeyError):  # TFDS: an unknown builder config
        known = ", ".join(f"p3m10k/{c.name}" for c in builder_lib.Builder.BUILDER_CONFIGS)
        raise ValueError(
            f"{data_config.tfds_name!r} is not a p3m10k build config; expected one of {known}, or a "
            f"synthetic size such as p3m10k/synthetic_64x64_12_2_2"
        ) from None


def built_configs(data_dir, dataset: str = "p3m10k") -> list[str]:
    """The configs of `dataset` built in the TFDS ``data_dir`` (folders holding a finished version)."""
    root = storage.resolve(data_dir) / dataset
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and _built_versions(p))


def _built_versions(config_dir: str) -> list[str]:
    """The version folders of a TFDS config folder that hold a finished build, sorted."""
    config_dir = storage.resolve(config_dir)
    if not config_dir.is_dir():
        return []
    return sorted(v.name for v in config_dir.iterdir() if (v / "dataset_info.json").is_file())


def resolve_process(process_index, process_count) -> tuple[int, int]:
    """(process index, process count), JAX's own where None (JAX imported only then)."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return int(process_index), int(process_count)


def _process_index() -> int:
    try:
        import jax

        return jax.process_index()
    except Exception:  # noqa: BLE001  (no JAX backend: a single process)
        return 0


def ensure_dataset(data_config, *, process_index: int | None = None, wait_timeout_s: float = 3600.0):
    """Checks that `data_config.tfds_name` is built in `data_config.data_dir`; returns its `DatasetInfo`.

    With `data_config.build_synthetic` and a synthetic name ('p3m10k/synthetic' or e.g.
    'p3m10k/synthetic_128x128_96_8_8'), a missing dataset is built here: process 0 builds, the others
    wait for it. TFDS writes into an `incomplete.*` folder and renames it at the end, so an
    interrupted build leaves nothing that looks finished. Anything else missing raises
    `FileNotFoundError` saying how to build it.
    """
    import tensorflow_datasets as tfds

    storage.check_bucket(data_config.data_dir)
    builder = get_builder(data_config)
    with storage.reported(data_config.data_dir, "reading the dataset folder"):
        prepared = builder.is_prepared()
    if prepared:
        return builder.info
    synthetic = synthetic_builder_config(data_config.tfds_name)
    data_dir = os.fspath(storage.resolve(data_config.data_dir))
    if synthetic is None or not data_config.build_synthetic:
        how = (
            f"python -m tfds_p3m10k.build --release_dir=<folder with P3M-10k/ or its zip> "
            f"--data_dir={data_config.data_dir}"
        )
        if synthetic is not None:
            how = (
                f"set config.data.build_synthetic=True, or python -m tfds_p3m10k.build --tfds_config=synthetic "
                f"--synthetic_image_size={synthetic.synthetic_image_size[0]}x{synthetic.synthetic_image_size[1]} "
                f"--synthetic_num_train={synthetic.synthetic_num_train} "
                f"--synthetic_num_test={synthetic.synthetic_num_test} --data_dir={data_config.data_dir}"
            )
        raise FileNotFoundError(
            f"TFDS dataset config.data.tfds_name={data_config.tfds_name!r} is not built in "
            f"config.data.data_dir={data_config.data_dir!r} ({data_dir}). Build it with: {how}"
        )
    if process_index is None:
        process_index = _process_index()
    if process_index == 0:
        _log.info("building %s into %s (first use)", data_config.tfds_name, data_dir)
        if not sys.stderr.isatty():
            tfds.disable_progress_bar()  # its bars would leave cursor-control codes in a redirected log
        _build_synthetic(synthetic, data_dir)
    else:
        deadline = time.time() + wait_timeout_s
        while not builder.is_prepared():
            if time.time() > deadline:
                raise TimeoutError(
                    f"process {process_index}: {data_config.tfds_name} not built by process 0 "
                    f"within {wait_timeout_s:.0f} s"
                )
            time.sleep(2.0)
            builder = get_builder(data_config)
    return get_builder(data_config).info


def _build_synthetic(synthetic, data_dir: str) -> None:
    """Builds the synthetic stand-in into ``data_dir``; a bucket gets a build made in a local temporary
    folder (ArrayRecord writes local files only), uploaded with its metadata last."""
    import tensorflow_datasets as tfds

    from tfds_p3m10k import p3m10k_dataset_builder as builder_lib

    download_config = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
    if not storage.is_remote(data_dir):
        with cli.without_tfds_banner():
            builder_lib.Builder(config=synthetic, data_dir=data_dir).download_and_prepare(
                download_config=download_config
            )
        return
    with tempfile.TemporaryDirectory(prefix="p3m_tfds_") as local, cli.without_tfds_banner():
        builder = builder_lib.Builder(config=synthetic, data_dir=local)
        builder.download_and_prepare(download_config=download_config)
        count = storage.upload_tfds_build(local, builder.data_dir, data_dir)
        _log.info("uploaded %d files of %s to %s", count, synthetic.name, data_dir)
