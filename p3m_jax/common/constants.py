"""Names shared across the layers: the networks' input normalisation and the files of a workdir."""

import os

# Input normalisation the networks were trained with (ImageNet statistics, RGB order).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# A training workdir of `python -m p3m_jax.main`:
CHECKPOINT_SUBDIR = "checkpoints"  # <workdir>/checkpoints/<step>/...
RUN_CONFIG_FILE = "config.json"  # arch, model options and the full config
METRICS_FILE = "metrics.jsonl"  # one row of training metrics per logged step
VALIDATION_LOG_FILE = "validation.jsonl"  # one row per validation
TEST_RESULTS_FILE = "test_results.json"  # the test splits' scores of the best checkpoint
BEST_METRIC = "SAD"  # model selection: the validation metric, lower is better
PROFILE_SUBDIR = "profile"  # <workdir>/profile: the jax.profiler trace of config.profile_steps

# The persistent compilation cache's folder when a command is given none (common/compilation_cache.py).
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "p3m_jax", "xla")
