"""Input pipelines for P3M-10k (TFDS ArrayRecord build read through grain, no TensorFlow).

Training: `create_train_iterator` (global jax.Arrays) / `create_host_iterator` (numpy).
Evaluation: `validation_dataset`, `test_dataset`, `FolderDataset`, `open_test_split` (evaluation_data.py).
Dataset checks: `ensure_dataset`. See pipeline.py (structure, determinism, checkpointing) and
transforms.py (the per-example transform).
"""

from p3m_jax.data.evaluation_data import EvalDataset, FolderDataset, open_test_split, test_dataset, validation_dataset
from p3m_jax.data.pipeline import (
    HostBatchIterator,
    TrainIterator,
    build_train_dataset,
    create_host_iterator,
    create_train_iterator,
    process_train_indices,
    train_indices,
)
from p3m_jax.data.builds import ensure_dataset
from p3m_jax.data.holdout import split_names, validation_count, validation_names
from p3m_jax.data.raw_records import BadExampleError, train_stores_fg_bg
from p3m_jax.data.transforms import ELEMENT_KEYS, TrainTransform

__all__ = [
    "BadExampleError",
    "ELEMENT_KEYS",
    "EvalDataset",
    "FolderDataset",
    "HostBatchIterator",
    "TrainIterator",
    "TrainTransform",
    "build_train_dataset",
    "create_host_iterator",
    "create_train_iterator",
    "ensure_dataset",
    "open_test_split",
    "process_train_indices",
    "split_names",
    "test_dataset",
    "train_indices",
    "train_stores_fg_bg",
    "validation_count",
    "validation_dataset",
    "validation_names",
]
