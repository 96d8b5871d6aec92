"""Shared helpers of the input-pipeline tests: tiny synthetic TFDS builds and a corrupted copy."""

from __future__ import annotations

import glob
import os
import shutil

import ml_collections
import numpy as np

SYNTHETIC_NAME = "p3m10k/synthetic_64x64_24_4_4"  # 24 train, 4 + 4 test, 64x64 PNG


def data_config(data_dir, **overrides) -> ml_collections.ConfigDict:
    """The quickstart's data group pointed at `data_dir`, with small test values."""
    from p3m_jax.configs import default

    config = default.get_config().data
    config.data_dir = os.fspath(data_dir)
    config.tfds_name = SYNTHETIC_NAME
    config.image_size = 32
    config.crop_sizes = (32, 48, 64)
    config.trimap_kernel_range = (3, 6)
    config.validation_count = 8
    config.num_workers = 0
    for key, value in overrides.items():
        config[key] = value
    return config


def build(data_dir) -> ml_collections.ConfigDict:
    from p3m_jax.data import builds

    config = data_config(data_dir)
    builds.ensure_dataset(config, process_index=0)
    return config


def corrupt_copy(config, dst_data_dir, record_index: int) -> tuple[ml_collections.ConfigDict, str]:
    """Copies the build and damages the image PNG of train record `record_index` (same length).

    The record still parses (the protobuf is intact), its image bytes no longer decode (PNG CRC).
    Returns the new config and the damaged example's name.
    """
    from array_record.python import array_record_module

    from p3m_jax.data import raw_records

    _, config_name = config.tfds_name.split("/")
    src = os.path.join(config.data_dir, "p3m10k", config_name)
    dst = os.path.join(os.fspath(dst_data_dir), "p3m10k", config_name)
    shutil.copytree(src, dst)
    new_config = data_config(dst_data_dir)
    (path,) = glob.glob(os.path.join(dst, "*", "p3m10k-train.array_record-*"))
    reader = array_record_module.ArrayRecordReader(path)
    records = list(reader.read(0, reader.num_records()))
    reader.close()
    raw = raw_records.open_split(new_config, "train")[record_index]
    image = raw["image"]
    serialized = records[record_index]
    at = serialized.find(image)
    assert at > 0, "image bytes not found in the record"
    middle = at + len(image) // 2
    records[record_index] = serialized[:middle] + bytes(64) + serialized[middle + 64 :]
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    return new_config, raw["name"].decode() if isinstance(raw["name"], bytes) else raw["name"]


def decoded_train_images(config) -> dict[bytes, int]:
    """Map from the RGB bytes of each decoded train image to its record index (identifies examples)."""
    from p3m_jax.data import decoding, raw_records

    split = raw_records.open_split(config, "train")
    out = {}
    for index in range(len(split)):
        image = decoding.decode_rgb(split[index]["image"])
        out[np.ascontiguousarray(image).tobytes()] = index
    return out
