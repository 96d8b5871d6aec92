"""`train_and_evaluate(config, workdir)`: the training run behind `python -m p3m_jax.main`.

One run, on every device of every process (one 1-D ``data`` mesh):
  1. check the config and the dataset (a bad value fails here, naming the field, before anything
     is written) and the workdir, and take the workdir's lock (one run per workdir);
  2. build the dataset if the config asks for the synthetic stand-in, the model and the optimizer;
  3. resume from the latest checkpoint in ``<workdir>/checkpoints`` (model, optimizer, step, RNG and
     the input iterator's position), or initialise (random, an ImageNet backbone, or fine-tuning
     weights);
  4. train: a progress line every ``log_every_steps`` (loss and its four parts, lr, images/s, step
     time, ETA) and the same numbers in TensorBoard; validation SAD/MSE/GRAD/CONN on the held-out
     slice every ``eval_every_steps``; asynchronous checkpoints every ``checkpoint_every_steps``
     (the last K plus the best by validation SAD; a failed save stops the run at the next step);
     SIGTERM saves and stops; a NaN/Inf loss or state stops before anything non-finite is
     validated or saved;
  5. at the end, the test splits are scored with the paper's strategy from the best checkpoint and
     written to ``<workdir>/test_results.json``.
Only process 0 writes logs, summaries and metadata; every process takes part in saves and in the
evaluation (each scores its share of the images).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from p3m_jax import data as data_lib
from p3m_jax import evaluate as evaluate_lib
from p3m_jax import inference
from p3m_jax import metrics as metrics_lib
from p3m_jax.fileio import atomic_write
from p3m_jax.models import ARCHITECTURES, build_model, init_variables
from p3m_jax.predictor import Predictor, init_key, variables_from_torch
from p3m_jax.train import mesh as mesh_lib
from p3m_jax.train import state as state_lib
from p3m_jax.train import step as step_lib
from p3m_jax.train.checkpointing import CHECKPOINT_SUBDIR, RUN_CONFIG_FILE, TrainCheckpointer, restore_variables
from p3m_jax.train.summary import METRICS_FILE, MetricWriter, drop_rows_after
from p3m_jax.train.workdir_lock import acquire_for_run

TEST_RESULTS_FILE = "test_results.json"
VALIDATION_LOG_FILE = "validation.jsonl"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_LOSS_PARTS = ("loss", "global", "local", "fusion", "composition")
_CP_COUNTS = {"icp_pasted": "icp_pasted_per_batch", "fcp_apply": "fcp_samples_per_batch"}


class ConfigError(ValueError):
    """A config value is invalid; the message names the field (e.g. ``config.batch_size``)."""


class NonFiniteLossError(FloatingPointError):
    """The training loss or state (parameters, BatchNorm statistics, optimizer state) became NaN
    or infinite; nothing non-finite was saved and the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------- checks
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
    if config.dtype not in _DTYPES:
        fail("dtype", f"{config.dtype!r} is not one of {sorted(_DTYPES)}")
    for field in ("batch_size", "num_train_steps", "log_every_steps", "keep_checkpoints"):
        if int(config[field]) < 1:
            fail(field, f"must be >= 1, got {config[field]}")
    for field in ("eval_every_steps", "checkpoint_every_steps", "num_summary_images"):
        if int(config[field]) < 0:
            fail(field, f"must be >= 0, got {config[field]}")
    if num_devices is not None and config.batch_size % num_devices:
        fail(
            "batch_size",
            f"{config.batch_size} is not divisible by the {num_devices} devices "
            f"of the mesh (the global batch is split evenly across devices)",
        )
    if config.param_sharding not in ("replicated", "fsdp"):
        fail("param_sharding", f"{config.param_sharding!r} is not 'replicated' or 'fsdp'")
    optimizer = config.optimizer
    if optimizer.name not in ("adam", "adamw"):
        fail("optimizer.name", f"{optimizer.name!r} is not 'adam' or 'adamw'")
    if optimizer.schedule not in ("constant", "warmup_cosine"):
        fail("optimizer.schedule", f"{optimizer.schedule!r} is not 'constant' or 'warmup_cosine'")
    for field in ("learning_rate", "warmup_steps", "weight_decay", "grad_clip_norm"):
        if optimizer[field] < 0:
            fail(f"optimizer.{field}", f"must be >= 0, got {optimizer[field]}")
    data = config.data
    if not str(data.tfds_name).startswith("p3m10k/"):
        fail("data.tfds_name", f"must name a p3m10k config ('p3m10k/<config>'), got {data.tfds_name!r}")
    if not data.crop_sizes or min(data.crop_sizes) < 1:
        fail("data.crop_sizes", f"needs at least one positive size, got {data.crop_sizes}")
    low, high = data.trimap_kernel_range
    if not 1 <= low <= high:
        fail("data.trimap_kernel_range", f"needs 1 <= low <= high, got {data.trimap_kernel_range}")
    for field in ("transition_crop_prob", "flip_prob"):
        if not 0.0 <= data[field] <= 1.0:
            fail(f"data.{field}", f"must be a probability in [0, 1], got {data[field]}")
    for field in ("validation_count", "num_workers"):
        if int(data[field]) < 0:
            fail(f"data.{field}", f"must be >= 0, got {data[field]}")
    for level in ("icp", "fcp"):
        if not 0.0 <= config.copy_paste[level].prob <= 1.0:
            fail(f"copy_paste.{level}.prob", f"must be a probability in [0, 1], got {config.copy_paste[level].prob}")
    size = int(config.data.image_size)
    if size < 32 or size % 32:
        fail("data.image_size", f"must be a positive multiple of 32 (five 2x poolings), got {size}")
    if config.eval.strategy not in inference.STRATEGIES:
        fail("eval.strategy", f"{config.eval.strategy!r} is not one of {inference.STRATEGIES}")
    if config.eval.validation_strategy not in inference.STRATEGIES:
        fail("eval.validation_strategy", f"{config.eval.validation_strategy!r} is not one of {inference.STRATEGIES}")
    for field in ("pretrained_backbone", "checkpoint"):
        path = config.init[field]
        if path and not os.path.exists(os.path.expanduser(path)):
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
    num_train = info.splits["train"].num_examples
    try:
        data_lib.validation_count(config.data, num_train)
    except ValueError as e:
        raise ConfigError(f"config.data.validation_count: {e}") from e


def prepare_workdir(workdir: str | os.PathLike) -> str:
    """Creates ``workdir`` and proves it is writable (a clear error now, not at the first save)."""
    workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{jax.process_index()}_{os.getpid()}")
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OSError(f"workdir {workdir} is not writable: {e.strerror or e}") from e
    return workdir


def model_options(config) -> dict:
    """build_model kwargs of the run (also stored in config.json for load_pretrained)."""
    return dict(config.model.to_dict()) if config.model else {}


# ----------------------------------------------------------------------------------------------- init
def initial_variables(config, model, rng) -> tuple[Any, str]:
    """Model variables to start from and a one-line description of where they came from."""

    def random_init():
        return jax.jit(lambda r: init_variables(model, r))(rng)

    if config.init.pretrained_backbone:
        from p3m_jax.weights.backbone import load_backbone  # pylint: disable=import-outside-toplevel

        variables, report = load_backbone(
            os.path.expanduser(config.init.pretrained_backbone), config.arch, random_init()
        )
        return variables, f"ImageNet backbone {config.init.pretrained_backbone}: {report.summary()}"
    path = os.path.expanduser(config.init.checkpoint)
    if path:
        if os.path.isdir(path):
            from p3m_jax.predictor import load_pretrained  # pylint: disable=import-outside-toplevel

            loaded = load_pretrained(path, config.arch)
            return loaded.variables, f"fine-tuning from p3m-jax checkpoint {path}"
        loaded, _ = variables_from_torch(path, config.arch, options=model_options(config))
        return loaded, f"fine-tuning from the authors' checkpoint {path}"
    return random_init(), "random initialisation"


# ------------------------------------------------------------------------------------------ preemption
class PreemptionWatcher:
    """Turns SIGTERM into a flag the loop checks between steps (agreed across processes)."""

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):  # noqa: ARG002
        self._flag.set()

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            # Every process must stop at the same step to save together: jax's preemption sync
            # point agrees on one (it is notified of SIGTERM by the distributed runtime).
            from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

            return bool(multihost_utils.reached_preemption_sync_point(step)) or self._flag.is_set()
        return self._flag.is_set()

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ------------------------------------------------------------------------------------------ evaluation
def _local_variables(state, gather) -> dict:
    """The state's model variables gathered whole onto this process's first device (for Predictor).

    ``gather`` is a jitted identity with replicated output shardings, built once per run.
    """
    gathered = gather(state.variables())
    return jax.tree_util.tree_map(lambda a: a.addressable_data(0), gathered)


def _combine_across_processes(per_image: list[dict]) -> tuple[dict, int]:
    """Dataset means over the images of every process (each scored its own share).

    PRIVACY metrics exist only for images with a facemask: means are NaN-aware per metric.
    """
    keys = metrics_lib.METRIC_KEYS + metrics_lib.PRIVACY_KEYS
    values = np.array([[row.get(k, math.nan) for k in keys] for row in per_image], np.float64).reshape(-1, len(keys))
    sums = np.nansum(values, axis=0)
    counts = np.sum(~np.isnan(values), axis=0).astype(np.float64)
    total = np.array([float(len(per_image))])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        sums, counts, total = (
            np.asarray(multihost_utils.process_allgather(x)).sum(axis=0) for x in (sums, counts, total)
        )
    means = {k: float(s / c) for k, s, c in zip(keys, sums, counts) if c}
    return means, int(total[0])


def evaluate_split(predictor, dataset, strategy: str, limit: int = 0) -> dict:
    """Scores ``dataset`` (this process's share) and returns the means over all processes."""
    result = evaluate_lib.evaluate(predictor, dataset, strategy, limit=limit or None, progress=False)
    means, count = _combine_across_processes(result["per_image"])
    return {
        "strategy": strategy,
        "count": count,
        "mean": means,
        "per_image": result["per_image"] if jax.process_count() == 1 else None,
        "wall_seconds": result["wall_seconds"],
    }


# ------------------------------------------------------------------------------------------ the loop
@dataclasses.dataclass
class _Meter:
    """Sums step metrics on the device between host reads (no per-step host synchronisation)."""

    sums: Any = None
    steps: int = 0
    images: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def add(self, metrics, batch_size: int):
        self.sums = metrics if self.sums is None else jax.tree_util.tree_map(jnp.add, self.sums, metrics)
        self.steps += 1
        self.images += batch_size

    def read(self) -> tuple[dict, float, int]:
        """(mean metrics, seconds since the last read, steps) and resets."""
        sums = jax.device_get(self.sums) if self.sums is not None else {}
        means = {k: float(v) / self.steps for k, v in sums.items()}
        elapsed, steps = time.perf_counter() - self.start, self.steps
        self.sums, self.steps, self.images, self.start = None, 0, 0, time.perf_counter()
        return means, elapsed, steps


@jax.jit
def _finite_leaves(tree) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)])


def _key_name(key) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def first_non_finite_leaf(state) -> str | None:
    """The path (e.g. ``batch_stats/decoder/tfi_0/bn1/var``) of the first leaf of the state's
    parameters, BatchNorm statistics or optimizer state that holds a NaN or Inf, or None.

    One reduction per leaf on the devices and a single read of the flags; called only where the
    loop validates or saves."""
    tree = {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}
    flags = np.asarray(jax.device_get(_finite_leaves(tree)))
    if flags.all():
        return None
    path, _ = jax.tree_util.tree_flatten_with_path(tree)[0][int(np.argmin(flags))]
    return "/".join(_key_name(k) for k in path)


def _last_good(checkpointer) -> str:
    latest = checkpointer.latest_step()
    if latest is None:
        return "No checkpoint was saved before it."
    return f"The last good checkpoint is step {latest} in {checkpointer.directory}."


def _format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains (or resumes) in ``workdir``; returns {"step", "stopped", "validation", "test"}.

    ``stopped`` is "finished" or "preempted" (SIGTERM: a checkpoint was saved; run again to
    resume). Raises ConfigError for a bad config (before anything is written to ``workdir``),
    WorkdirLockedError when another live run holds ``workdir``, NonFiniteLossError if the loss or
    the state diverges, CheckpointError when a save fails (at the step after it failed).
    """
    validate_config(config)
    mesh_lib.initialize_distributed_if_needed()
    mesh = mesh_lib.make_mesh()
    validate_config(config, num_devices=mesh.size)
    check_dataset(config)
    workdir = prepare_workdir(workdir)
    lock = acquire_for_run(workdir, _log)
    try:
        return _train(config, workdir, mesh)
    finally:
        if lock is not None:
            lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict:
    is_main = jax.process_index() == 0
    if is_main:
        with atomic_write(os.path.join(workdir, RUN_CONFIG_FILE)) as f:
            json.dump(
                {
                    "arch": config.arch,
                    "model_options": model_options(config),
                    "config": json.loads(config.to_json_best_effort()),
                },
                f,
                indent=1,
            )

    model = build_model(config.arch, dtype=_DTYPES[config.dtype], remat=bool(config.remat), **model_options(config))
    optimizer, lr_schedule = state_lib.make_optimizer(config.optimizer, config.num_train_steps)
    image_size = (config.data.image_size, config.data.image_size)
    rng = init_key(config.seed)

    def fresh_state(variables=None):
        return state_lib.create_train_state(model, optimizer, rng, image_size, variables=variables)

    abstract_state = jax.eval_shape(fresh_state)
    shardings = state_lib.state_shardings(abstract_state, mesh, config.param_sharding)
    abstract_state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )

    train_iter = data_lib.create_train_iterator(
        config.data,
        seed=config.seed,
        global_batch_size=config.batch_size,
        sharding=mesh_lib.batch_sharding(mesh),
        extra_transforms=copy_paste_transforms(config),
    )
    checkpointer = TrainCheckpointer(os.path.join(workdir, CHECKPOINT_SUBDIR), keep=config.keep_checkpoints, log=_log)
    latest = checkpointer.latest_step()
    if latest is not None:
        state = checkpointer.restore(latest, abstract_state, train_iter)
        _log(f"resumed from {checkpointer.directory}/{latest} (step {int(state.step)})")
    else:
        variables, origin = initial_variables(config, model, rng)
        state = jax.jit(fresh_state, out_shardings=shardings)(variables)
        _log(f"initialised {config.arch} ({origin})")
    if is_main:  # rows of steps after the checkpoint (all, without one) are logged again by this run
        for name in (METRICS_FILE, VALIDATION_LOG_FILE):
            drop_rows_after(os.path.join(workdir, name), int(state.step))
    train_step = step_lib.make_train_step(
        model, optimizer, mesh, shardings, lr_schedule=lr_schedule, **fcp_step_options(config)
    )

    writer = MetricWriter(workdir, enabled=is_main)
    validation = data_lib.validation_dataset(config.data)
    gather_replicated = jax.jit(lambda tree: tree, out_shardings=mesh_lib.replicated(mesh))
    predictor = None
    preemption = PreemptionWatcher()
    meter = _Meter()
    step = int(state.step)
    first_step = step
    last_validation: dict = {}
    stopped = "finished"
    _log(
        f"training {config.arch} on {mesh.size} device(s) in {jax.process_count()} process(es), "
        f"global batch {config.batch_size}, steps {step} -> {config.num_train_steps}, workdir {workdir}"
    )

    def flush_metrics(step: int) -> None:
        """Reads the metrics summed since the last read: logs them, and stops on NaN/Inf."""
        if meter.steps == 0:
            return
        means, elapsed, steps = meter.read()
        if not all(math.isfinite(means.get(k, 0.0)) for k in _LOSS_PARTS):
            checkpointer.wait()
            raise NonFiniteLossError(
                f"non-finite training loss between steps {step - steps + 1} and {step} "
                f"({', '.join(f'{k}={means.get(k)}' for k in _LOSS_PARTS)}); stopped without saving it. "
                f"{_last_good(checkpointer)} "
                f"Lower config.optimizer.learning_rate or set config.optimizer.grad_clip_norm."
            )
        losses = (
            f"loss {means['loss']:.4f} (global {means['global']:.4f} local {means['local']:.4f} "
            f"fusion {means['fusion']:.4f} comp {means['composition']:.4f})"
        )
        scalars = {f"train/{k}": v for k, v in means.items()}
        if step == first_step + 1:  # this step also compiled the program: no speed to report
            writer.write_scalars(step, scalars)
            _log(f"step {step}/{config.num_train_steps} | {losses} | first step incl. compilation {elapsed:.1f} s")
            return
        per_step = elapsed / steps
        images_per_s = config.batch_size / per_step
        eta = per_step * (config.num_train_steps - step)
        writer.write_scalars(
            step,
            {
                **scalars,
                "train/images_per_second": images_per_s,
                "train/images_per_second_per_device": images_per_s / mesh.size,
                "train/step_seconds": per_step,
            },
        )
        _log(
            f"step {step}/{config.num_train_steps} | {losses} | lr {means.get('learning_rate', math.nan):.2e} | "
            f"{images_per_s:.1f} img/s ({images_per_s / mesh.size:.1f}/device) | {per_step:.3f} s/step | "
            f"ETA {_format_eta(eta)}"
            + "".join(f" | {name} {means[name]:.2f}" for name in _CP_COUNTS.values() if name in means)
        )

    def run_validation(step: int) -> dict:
        nonlocal predictor
        variables = _local_variables(state, gather_replicated)
        if predictor is None:
            predictor = Predictor(config.arch, variables, options=model_options(config))
        else:
            predictor.variables = variables  # same shapes: the jitted forward is reused
        result = evaluate_split(predictor, validation, config.eval.validation_strategy, config.eval.limit)
        means = result["mean"]
        writer.write_scalars(step, {f"val/{k}": v for k, v in means.items()})
        if is_main and config.num_summary_images:
            images = {}
            for index in range(min(config.num_summary_images, len(validation))):
                example = validation[index]
                alpha = inference.predict_alpha(
                    predictor, np.asarray(example["image"]), config.eval.validation_strategy
                )
                images[f"val_matte/{index}"] = alpha
            writer.write_images(step, images)
            with open(os.path.join(workdir, VALIDATION_LOG_FILE), "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "count": result["count"], **means}) + "\n")
        _log(
            f"validation @ {step} ({result['count']} images, {config.eval.validation_strategy}): "
            + ", ".join(f"{k} {means[k]:.4f}" for k in ("SAD", "MSE", "GRAD", "CONN") if k in means)
        )
        return means

    if step < config.num_train_steps:
        # Said before the long silence: XLA:GPU's compile and autotuning of a real step takes minutes.
        _log(
            "compiling the train step on the first batch (minutes on a GPU; persistent compilation cache: "
            f"{jax.config.jax_compilation_cache_dir or 'off'})"
        )
    try:
        while step < config.num_train_steps:
            batch = next(train_iter)
            state, metrics = train_step(state, batch)
            # P3M-CP: how many samples of the batch got a pasted face (ICP) / replaced features (FCP).
            metrics.update(
                {name: jnp.sum(batch[key], dtype=jnp.float32) for key, name in _CP_COUNTS.items() if key in batch}
            )
            step += 1
            meter.add(metrics, config.batch_size)
            checkpointer.poll()  # a failed background save stops the run now, naming its step
            if step == first_step + 1:
                flush_metrics(step)  # the first step includes compilation: time the rest apart
                if latest is None:  # written after the compile: a run killed before leaves no event file
                    writer.write_text(0, {"config": f"```\n{config}\n```"})
            is_last = step == config.num_train_steps
            preempted = preemption.should_stop(step)
            evaluate_now = (
                bool(config.eval_every_steps) and not preempted and (step % config.eval_every_steps == 0 or is_last)
            )
            save_now = (
                is_last
                or preempted
                or evaluate_now
                or (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
            )
            if step % config.log_every_steps == 0 or save_now:
                flush_metrics(step)  # also the NaN guard: nothing non-finite is ever saved
            if save_now or evaluate_now:
                bad_leaf = first_non_finite_leaf(state)
                if bad_leaf is not None:
                    checkpointer.wait()
                    raise NonFiniteLossError(
                        f"non-finite values in {bad_leaf} after step {step}; stopped without saving or "
                        f"scoring them. {_last_good(checkpointer)} "
                        f"Lower config.optimizer.learning_rate or set config.optimizer.grad_clip_norm."
                    )
            if evaluate_now:
                last_validation = run_validation(step)
            if save_now:
                # Only a checkpoint validated at its own step carries metrics (and can be "best").
                checkpointer.save(step, state, train_iter, metrics=last_validation if evaluate_now else None)
            if preempted:
                stopped = "preempted"
                _log(f"SIGTERM: saved step {step}; run the same command again to resume")
                break
        checkpointer.wait()
        train_iter.close()

        test_results = {}
        if stopped == "finished" and config.eval.test_splits:
            test_results = evaluate_test_splits(config, checkpointer, workdir, predictor)
    finally:
        preemption.restore()
        train_iter.close()
        checkpointer.close()  # waits for a save still in flight
        writer.close()
    return {"step": step, "stopped": stopped, "validation": last_validation, "test": test_results}


def evaluate_test_splits(
    config, checkpointer: TrainCheckpointer, workdir: str, predictor=None, step: int | None = None
) -> dict:
    """Scores a checkpoint (default: the best by validation SAD) on config.eval.test_splits.

    Writes ``<workdir>/test_results.json`` (process 0) and returns {split: result}.
    """
    step, variables = restore_variables(checkpointer.directory, step)
    if predictor is None:
        predictor = Predictor(config.arch, variables, options=model_options(config))
    else:
        predictor.variables = jax.tree_util.tree_map(jnp.asarray, variables)
    results = {}
    for split in config.eval.test_splits:
        dataset = data_lib.test_dataset(config.data, split)
        results[split] = evaluate_split(predictor, dataset, config.eval.strategy, config.eval.limit)
        means = results[split]["mean"]
        _log(
            f"test {split} @ step {step} ({results[split]['count']} images, {config.eval.strategy}): "
            + ", ".join(f"{k} {means[k]:.4f}" for k in evaluate_lib.REPORTED_KEYS if k in means)
        )
    if jax.process_index() == 0:
        evaluate_lib.write_json(
            os.path.join(workdir, TEST_RESULTS_FILE),
            {"step": step, "arch": config.arch, "strategy": config.eval.strategy, "splits": results},
        )
    return results


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str | os.PathLike, which: str = "best") -> dict:
    """`--mode=eval`: scores the best (or latest) checkpoint of ``workdir`` on the test splits."""
    validate_config(config)
    mesh_lib.initialize_distributed_if_needed()
    workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
    directory = os.path.join(workdir, CHECKPOINT_SUBDIR)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {workdir} (expected {directory}); train first")
    data_lib.ensure_dataset(config.data)
    checkpointer = TrainCheckpointer(directory, read_only=True)
    try:
        step = checkpointer.best_step() if which == "best" else checkpointer.latest_step()
        if step is None:
            raise FileNotFoundError(f"no finished checkpoint in {directory}")
        return evaluate_test_splits(config, checkpointer, workdir, step=step)
    finally:
        checkpointer.close()


def copy_paste_transforms(config) -> list:
    """P3M-CP's per-example input transforms (ICP, and FCP's aligned source faces), when enabled."""
    from p3m_jax.data.copy_paste import make_copy_paste_transforms  # pylint: disable=import-outside-toplevel

    return make_copy_paste_transforms(config.copy_paste, seed=config.seed)


def fcp_step_options(config) -> dict:
    """make_train_step kwargs for P3M-CP's feature level (FCP): the model's ``fcp`` argument."""
    fcp = config.copy_paste.fcp
    if not fcp.enabled:
        return {}
    from p3m_jax.models.copy_paste import fcp_inputs  # pylint: disable=import-outside-toplevel

    start_step, layers = int(fcp.start_step), tuple(fcp.layers)
    return {"model_kwargs_fn": lambda batch, state: {"fcp": fcp_inputs(batch, state.step, start_step, layers)}}
