"""Input pipelines for P3M-10k (TFDS ArrayRecord build read through grain, no TensorFlow).

Training: `create_train_iterator` (global jax.Arrays) / `create_host_iterator` (numpy).
Evaluation: `validation_dataset`, `test_dataset`. Dataset checks: `ensure_dataset`.
See pipeline.py (structure, determinism, checkpointing) and transforms.py (the per-example transform).
"""

from p3m_jax.data.pipeline import (
    EvalDataset,
    HostBatchIterator,
    TrainIterator,
    build_train_dataset,
    create_host_iterator,
    create_train_iterator,
    process_train_indices,
    test_dataset,
    train_indices,
    validation_dataset,
)
from p3m_jax.data.source import BadExampleError, ensure_dataset, split_names, validation_count, validation_names
from p3m_jax.data.transforms import ELEMENT_KEYS, TrainTransform

__all__ = [
    "BadExampleError",
    "ELEMENT_KEYS",
    "EvalDataset",
    "HostBatchIterator",
    "TrainIterator",
    "TrainTransform",
    "build_train_dataset",
    "create_host_iterator",
    "create_train_iterator",
    "ensure_dataset",
    "process_train_indices",
    "split_names",
    "test_dataset",
    "train_indices",
    "validation_count",
    "validation_dataset",
    "validation_names",
]
