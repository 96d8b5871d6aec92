"""Raw access to the TFDS `p3m10k` build: encoded bytes per feature, decoded on demand.

`tfds.data_source` decodes every image feature of an example, although training needs only the JPEG
and the alpha PNG. Here the ArrayRecord records are read with `tfds.decode.SkipDecoding` for every
image feature (no TensorFlow), and `decode_*` below turn only the bytes the caller needs into arrays with OpenCV,
optionally at a reduced JPEG DCT scale.

Also here: the builder lookup / on-demand synthetic build (`ensure_dataset`), the validation slice of
train chosen by a stable hash of each example's name (`validation_names`), and `BadExampleError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import re
import struct
import tempfile
import time
from concurrent import futures
from typing import Any, Sequence

import cv2
import numpy as np

from p3m_jax.common import cli, storage

_log = logging.getLogger(__name__)

IMAGE_FEATURES = ("image", "alpha", "trimap", "facemask", "fg", "bg")
TRAIN_SPLIT = "train"
TEST_SPLITS = ("p3m_500_p", "p3m_500_np")
_SYNTHETIC_NAME = re.compile(r"^synthetic(?:_(\d+)x(\d+)_(\d+)_(\d+)_(\d+)(?:_seed(\d+))?)?$")
NAMES_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "p3m_jax", "names")


class BadExampleError(ValueError):
    """An example that cannot be decoded or whose maps disagree in size.

    Attributes: `name` (the example's name, '' if unreadable), `index` (its record index in the split),
    `reason`. Picklable, so it crosses grain's worker processes unchanged.
    """

    def __init__(self, name: str, index: int, reason: str):
        super().__init__(name, index, reason)
        self.name, self.index, self.reason = name, index, reason

    def __str__(self) -> str:
        return f"bad example {self.name or '<unnamed>'!r} (record {self.index}): {self.reason}"


# ----------------------------------------------------------------------------------------- TFDS builder
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


def open_split(data_config, split: str):
    """Random-access source of `split` whose image features are the stored encoded bytes."""
    import tensorflow_datasets as tfds

    builder = get_builder(data_config)
    decoders = {key: tfds.decode.SkipDecoding() for key in IMAGE_FEATURES}
    return builder.as_data_source(split=split, decoders=decoders)


def train_stores_fg_bg(data_config, sample: int = 8) -> bool:
    """Whether the build stores foreground/background for train (the composition loss needs them),
    judged from the first `sample` records: builds store them for all of train or for none."""
    source = RawSource(open_split(data_config, TRAIN_SPLIT))
    return any(source[i].get("has_fg_bg", False) for i in range(min(sample, len(source))))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RawSource:
    """`source[i]` = the raw record `indices[i]` of a split as a dict of encoded bytes.

    Keys: image, alpha, trimap, facemask, fg, bg (bytes), has_facemask, has_fg_bg (bool), name (str),
    index (the record index in the split). A record that cannot be parsed comes back as
    `{'index': i, 'name': '', 'error': message}` so that the transform can stop or skip it by name.
    Picklable (grain ships it to its worker processes).
    """

    def __init__(self, data_source, indices: Sequence[int] | None = None):
        self._source = data_source
        self._indices = np.arange(len(data_source)) if indices is None else np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = int(self._indices[i])
        try:
            record = self._source[index]
        except Exception as e:  # noqa: BLE001  (a corrupt record is reported by the transform, by index)
            return {"index": index, "name": "", "error": f"unreadable record: {type(e).__name__}: {e}"}
        out = {key: record[key] for key in IMAGE_FEATURES}
        out["has_facemask"] = bool(record["has_facemask"])
        out["has_fg_bg"] = bool(record["has_fg_bg"])
        out["name"] = _text(record["name"])
        out["index"] = index
        return out

    def __repr__(self) -> str:
        return f"RawSource({self._source!r}, {len(self)} records)"


# ----------------------------------------------------------------------------------------- decoding
def is_jpeg(data: bytes) -> bool:
    return data[:2] == b"\xff\xd8"


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's SOF marker without decoding it; None if not found."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return int(height), int(width)
        pos += 2 + length
    return None


_REDUCED_COLOR = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def decode_bgr(data: bytes, reduce: int = 1) -> np.ndarray | None:
    """HxWx3 uint8 in OpenCV's BGR order (None if undecodable); JPEGs at 1/`reduce` DCT scale."""
    flag = _REDUCED_COLOR[reduce] if reduce > 1 and is_jpeg(data) else cv2.IMREAD_COLOR
    return cv2.imdecode(np.frombuffer(data, np.uint8), flag)


def decode_rgb(data: bytes) -> np.ndarray | None:
    image = decode_bgr(data)
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_grey(data: bytes) -> np.ndarray | None:
    """HxW uint8 (channel 0 of multi-channel files, as the builder stores masks); None if undecodable."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.dtype != np.uint8:
        return None
    if array.ndim == 3:
        # OpenCV returns BGR(A); channel 0 of the file is the last colour channel here.
        array = np.ascontiguousarray(array[..., 2] if array.shape[-1] >= 3 else array[..., 0])
    return array


# ----------------------------------------------------------------------------------- validation slice
def _hash_key(name: str) -> bytes:
    return hashlib.sha256(name.encode("utf-8")).digest()


def _names_cache_path(data_config, split: str, num_examples: int) -> str:
    builder = get_builder(data_config)
    info_file = storage.resolve(os.fspath(builder.data_dir)) / "dataset_info.json"
    try:
        stamp = float(info_file.stat().mtime)
    except (OSError, ValueError, AttributeError):
        stamp = 0.0
    key = json.dumps([os.fspath(builder.data_dir), split, num_examples, stamp])
    return os.path.join(NAMES_CACHE_DIR, hashlib.sha1(key.encode()).hexdigest() + ".json")


def split_names(data_config, split: str, *, use_cache: bool = True) -> list[str]:
    """The `name` of every record of `split`, in record order ('' for unreadable records).

    Reading them means reading every record once (in threads); the list is cached in
    ~/.cache/p3m_jax/names keyed by the dataset folder, split, size and build time.
    """
    source = open_split(data_config, split)
    count = len(source)
    path = _names_cache_path(data_config, split, count)
    if use_cache and os.path.exists(path):
        try:
            with open(path) as f:
                names = json.load(f)
            if len(names) == count:
                return names
        except (OSError, ValueError):
            pass

    def read(index: int) -> str:
        try:
            return _text(source[index]["name"])
        except Exception:  # noqa: BLE001  (reported by name-less index when the transform meets it)
            return ""

    with futures.ThreadPoolExecutor(8) as pool:
        names = list(pool.map(read, range(count)))
    if use_cache:
        try:
            os.makedirs(NAMES_CACHE_DIR, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(names, f)
            os.replace(tmp, path)
        except OSError as e:
            _log.warning("could not cache split names in %s: %s", path, e)
    return names


def validation_count(data_config, num_train: int) -> int:
    """Examples held out: `validation_fraction` of train when > 0, else `validation_count`."""
    fraction = float(data_config.validation_fraction)
    count = int(round(fraction * num_train)) if fraction > 0 else int(data_config.validation_count)
    if not 0 <= count < num_train:
        raise ValueError(
            f"validation slice of {count} examples out of {num_train} train examples: "
            f"check config.data.validation_count / validation_fraction"
        )
    return count


def validation_split(names: Sequence[str], count: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation indices, training indices), both sorted, from the train split's record names.

    The validation slice is the `count` names with the smallest SHA-256: independent of the process
    count, the seed and the record order, and stable when examples are added (mostly the same names).
    """
    order = sorted(range(len(names)), key=lambda i: (_hash_key(names[i]), i))
    held_out = np.sort(np.asarray(order[:count], np.int64))
    mask = np.ones(len(names), bool)
    mask[held_out] = False
    return held_out, np.flatnonzero(mask).astype(np.int64)


def validation_names(data_config) -> list[str]:
    """Names of the held-out validation slice of train, sorted (the evaluation order)."""
    names = split_names(data_config, TRAIN_SPLIT)
    held_out, _ = validation_split(names, validation_count(data_config, len(names)))
    return sorted(names[i] for i in held_out)
