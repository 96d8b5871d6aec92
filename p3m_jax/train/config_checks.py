"""Checks of a training config before anything runs: every field's value (`validate_config`, which
builds each consumer's options object, the one place that checks its fields) and the fields that
depend on the dataset (`check_dataset`). Errors name the field."""

from __future__ import annotations


import jax.numpy as jnp
import ml_collections

from p3m_jax import data as data_lib
from p3m_jax.common import storage
from p3m_jax.common.errors import ConfigError
from p3m_jax.data.cp_transforms import CopyPasteOptions
from p3m_jax.data.pipeline import PipelineOptions
from p3m_jax.data.transforms import TrainTransform
from p3m_jax.inference import strategies
from p3m_jax.models import ARCHITECTURES, remat_policy
from p3m_jax.train.optimizer import OptimizerOptions
from p3m_jax.train.profiling import ProfileWindow
from p3m_jax.train.step import FCPOptions, StepOptions

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ConfigError naming the first bad field. ``num_devices`` checks batch divisibility.

    Without ``num_devices`` nothing here touches the JAX backend, so it can run before
    ``jax.distributed.initialize()`` (the device count of every process divides the mesh size,
    so divisibility by devices implies divisibility by processes).
    """

    def fail(field, message):
        raise ConfigError(f"config.{field}: {message}")

    if config.arch not in ARCHITECTURES:
        fail("arch", f"unknown architecture {config.arch!r}; expected one of {sorted(ARCHITECTURES)}")
    if config.dtype not in DTYPES:
        fail("dtype", f"{config.dtype!r} is not one of {sorted(DTYPES)}")
    for field in ("batch_size", "num_train_steps", "log_every_steps", "keep_checkpoints"):
        if int(config[field]) < 1:
            fail(field, f"must be >= 1, got {config[field]}")
    for field in ("eval_every_steps", "checkpoint_every_steps", "num_summary_images"):
        if int(config[field]) < 0:
            fail(field, f"must be >= 0, got {config[field]}")
    step_options = StepOptions.from_config(config)
    if num_devices is not None and config.batch_size % (num_devices * step_options.grad_accum_steps):
        fail(
            "batch_size",
            f"{config.batch_size} is not divisible by the {num_devices} devices of the mesh times "
            f"config.grad_accum_steps={step_options.grad_accum_steps} (each micro-batch is split evenly "
            f"across devices)",
        )
    try:
        remat_policy(config.remat)
    except ValueError as e:
        fail("remat", str(e))
    if float(config.device_memory_gib) < 0:
        fail("device_memory_gib", f"must be >= 0 (0 reads the device), got {config.device_memory_gib}")
    if config.eval.select_ema and step_options.ema_decay == 0:
        fail("eval.select_ema", "needs config.ema_decay > 0 (there is no EMA to select by)")
    if config.param_sharding not in ("replicated", "fsdp"):
        fail("param_sharding", f"{config.param_sharding!r} is not 'replicated' or 'fsdp'")
    # Each consumer's options check their own fields once, when built; building them here reports a bad
    # value before anything runs.
    OptimizerOptions.from_config(config.optimizer)
    data = config.data
    if not str(data.tfds_name).startswith(("p3m10k/", "portrait_folder/")):
        fail(
            "data.tfds_name",
            f"must name a p3m10k config ('p3m10k/<config>') or a folder build ('portrait_folder/<name>'), "
            f"got {data.tfds_name!r}",
        )
    if int(data.validation_count) < 0:
        fail("data.validation_count", f"must be >= 0, got {data.validation_count}")
    TrainTransform.from_config(data)
    PipelineOptions.from_config(data)
    for level in ("icp", "fcp"):
        CopyPasteOptions.from_config(level, config.copy_paste[level])
    FCPOptions.from_config(config.copy_paste.fcp)
    window = ProfileWindow.from_config(config.profile_steps)
    if window and window.last > config.num_train_steps:
        fail("profile_steps", f"step {window.last} is past config.num_train_steps={config.num_train_steps}")
    size = int(config.data.image_size)
    if size < 32 or size % 32:
        fail("data.image_size", f"must be a positive multiple of 32 (five 2x poolings), got {size}")
    if config.eval.strategy not in strategies.STRATEGIES:
        fail("eval.strategy", f"{config.eval.strategy!r} is not one of {strategies.STRATEGIES}")
    if config.eval.validation_strategy not in strategies.STRATEGIES:
        fail("eval.validation_strategy", f"{config.eval.validation_strategy!r} is not one of {strategies.STRATEGIES}")
    for field in ("pretrained_backbone", "checkpoint"):
        path = config.init[field]
        if path:
            storage.check_bucket(path)
            if not storage.resolve(path).exists():
                fail(f"init.{field}", f"no such file or directory: {path}")
    if config.init.pretrained_backbone and config.init.checkpoint:
        fail("init", "set at most one of init.pretrained_backbone and init.checkpoint")


def check_dataset(config: ml_collections.ConfigDict) -> None:
    """Finds (or builds, for the synthetic stand-in) the dataset and checks the data fields that
    depend on it; raises ConfigError naming the field, FileNotFoundError for an unbuilt dataset."""
    try:
        info = data_lib.ensure_dataset(config.data)
    except ValueError as e:  # an unknown or malformed name
        raise ConfigError(f"config.data.tfds_name: {e}") from None
    if "train" not in info.splits:
        raise ConfigError(
            f"config.data.tfds_name: {config.data.tfds_name} has no train split (splits: {list(info.splits)})"
        )
    missing = [split for split in config.eval.test_splits if split not in info.splits or split == "train"]
    if missing:
        raise ConfigError(
            f"config.eval.test_splits: {config.data.tfds_name} has no test split {', '.join(missing)} "
            f"(its splits: {', '.join(s for s in info.splits if s != 'train')})"
        )
    num_train = info.splits["train"].num_examples
    try:
        data_lib.validation_count(config.data, num_train)
    except ValueError as e:
        raise ConfigError(f"config.data.validation_count: {e}") from e


def model_options(config) -> dict:
    """build_model kwargs of the run (also stored in config.json for load_pretrained)."""
    return dict(config.model.to_dict()) if config.model else {}
