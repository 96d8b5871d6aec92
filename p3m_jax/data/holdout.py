"""The validation slice held out of train: the names of a split's records (read once, cached under
~/.cache/p3m_jax/names) and the slice chosen by a stable hash of each name."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent import futures
from typing import Sequence

import numpy as np

from p3m_jax.common import storage
from p3m_jax.data.builds import get_builder
from p3m_jax.data.raw_records import TRAIN_SPLIT, open_split, text

_log = logging.getLogger(__name__)

NAMES_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "p3m_jax", "names")


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
            return text(source[index]["name"])
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
