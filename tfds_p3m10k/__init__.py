"""p3m10k dataset: TFDS builder for P3M-10k portrait matting (no TensorFlow needed).

Importing this package registers the `p3m10k` builder with TFDS. Reading back a
built dataset through `tfds.data_source` works without importing it.
"""

from tfds_p3m10k.p3m10k_dataset_builder import Builder
from tfds_p3m10k.p3m10k_dataset_builder import P3m10k
from tfds_p3m10k.p3m10k_dataset_builder import P3m10kConfig
from tfds_p3m10k.p3m10k_dataset_builder import synthetic_config

__all__ = ["Builder", "P3m10k", "P3m10kConfig", "synthetic_config"]
