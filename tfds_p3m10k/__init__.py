"""TFDS builders for portrait matting, no TensorFlow needed: `p3m10k` (P3M-10k and its synthetic
stand-in) and `portrait_folder` (your own portraits, PPM-100, AIM-500).

Importing a builder module registers its builder with TFDS; the names below load it on first use, so
that `tfds_p3m10k.folder_layout` and the other light modules import without TensorFlow Datasets.
Reading back a built dataset through `tfds.data_source` works without importing either.
"""

import importlib

_LAZY = {
    "Builder": "tfds_p3m10k.p3m10k_dataset_builder",
    "P3m10k": "tfds_p3m10k.p3m10k_dataset_builder",
    "P3m10kConfig": "tfds_p3m10k.p3m10k_dataset_builder",
    "synthetic_config": "tfds_p3m10k.p3m10k_dataset_builder",
    "PortraitFolder": "tfds_p3m10k.portrait_folder_builder",
    "folder_config": "tfds_p3m10k.portrait_folder_builder",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tfds_p3m10k' has no attribute {name!r}")
