"""`train_and_evaluate(config, workdir)`: the training run behind `python -m p3m_jax.main`.

One run, on every device of every process (one 1-D ``data`` mesh):
  1. check the config and the dataset (a bad value fails here, naming the field, before anything
     is written) and the workdir, and take the workdir's lock (one run per workdir);
  2. build the dataset if the config asks for the synthetic stand-in, the model and the optimizer;
  3. resume from the latest checkpoint in ``<workdir>/checkpoints`` (model, optimizer, step, RNG and
     the input iterator's position), or initialise (random, an ImageNet backbone, or fine-tuning
     weights);
  4. train: a progress line every ``log_every_steps``, and at least every 30 s in a one-process run
     (loss and its four parts, lr, images/s, step time, ETA) and the same numbers in TensorBoard; validation SAD/MSE/GRAD/CONN on the held-out
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
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from p3m_jax import data as data_lib
from p3m_jax.common import storage
from p3m_jax.common.constants import (
    CHECKPOINT_SUBDIR,
    METRICS_FILE,
    PROFILE_SUBDIR,
    TEST_RESULTS_FILE,
    VALIDATION_LOG_FILE,
)
from p3m_jax.evaluation.scoring import evaluate_split
from p3m_jax.inference import strategies
from p3m_jax.inference.predictor import Predictor
from p3m_jax.train import memory_plan
from p3m_jax.train import mesh as mesh_lib
from p3m_jax.train.checkpointing import TrainCheckpointer
from p3m_jax.train.config_checks import ConfigError, check_dataset, model_options, validate_config
from p3m_jax.train.guards import NonFiniteLossError, PreemptionWatcher, first_non_finite_leaf, last_good_checkpoint
from p3m_jax.train.initialization import copy_paste_transforms, initial_variables, prepare_workdir, write_run_config
from p3m_jax.train.program import TrainProgram
from p3m_jax.train.profiling import ProfileWindow, StepProfiler
from p3m_jax.train.scoring import evaluate_test_splits, local_variables
from p3m_jax.train.summary import MetricWriter, append_row, drop_rows_after, log as _log, summary_panel
from p3m_jax.train.workdir_lock import acquire_for_run
from p3m_jax.weights.initialize import init_key

__all__ = [
    "ConfigError",
    "MemoryPlanError",
    "NonFiniteLossError",
    "PreemptionWatcher",
    "evaluate_workdir",
    "train_and_evaluate",
]
MemoryPlanError = memory_plan.MemoryPlanError

_LOSS_PARTS = ("loss", "global", "local", "fusion", "composition")
_CP_COUNTS = {"icp_pasted": "icp_pasted_per_batch", "fcp_apply": "fcp_samples_per_batch"}
# A one-process run prints progress at least this often whatever log_every_steps and the step time
# (slow CPU steps). Multi-process runs keep to log_every_steps: every process must stop on a NaN at
# the same step.
PROGRESS_EVERY_S = 30.0
CPU_LIMIT_NOTE = " (the machine's available RAM per CPU device; config.device_memory_gib overrides it)"


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


def _format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, rescore: bool = False) -> dict:
    """Trains (or resumes) in ``workdir``; returns {"step", "stopped", "validation", "test"}.

    ``stopped`` is "finished", "preempted" (SIGTERM: a checkpoint was saved; run again to
    resume) or "already finished" (the workdir holds the last step and the test results: nothing is
    done unless ``rescore``, which scores the test splits again). Raises ConfigError for a bad config
    (before anything is written to ``workdir``),
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
        return _train(config, workdir, mesh, rescore)
    finally:
        if lock is not None:
            lock.release()


def _already_finished(config: ml_collections.ConfigDict, workdir: str) -> int | None:
    """The last step when ``workdir`` holds a finished run (its final checkpoint and, when the config
    scores test splits, their results); else None."""
    root = storage.resolve(workdir)
    directory = root / CHECKPOINT_SUBDIR
    if not directory.is_dir():
        return None
    checkpointer = TrainCheckpointer(directory, read_only=True)
    try:
        latest = checkpointer.latest_step()
    finally:
        checkpointer.close()
    if latest is None or latest < config.num_train_steps:
        return None
    if config.eval.test_splits and not (root / TEST_RESULTS_FILE).is_file():
        return None  # stopped while scoring the test splits: scored now
    return latest


def _train(config: ml_collections.ConfigDict, workdir: str, mesh, rescore: bool = False) -> dict:
    is_main = jax.process_index() == 0
    root = storage.resolve(workdir)  # the workdir as a path, local or gs://
    finished = None if rescore else _already_finished(config, workdir)
    if finished is not None:
        _log(
            f"{workdir} holds a finished run (step {finished} of {config.num_train_steps}"
            + (f", test results in {TEST_RESULTS_FILE}" if config.eval.test_splits else "")
            + "): nothing to do. --rescore scores the test splits again; a new --workdir starts a new run."
        )
        return {"step": finished, "stopped": "already finished", "validation": {}, "test": {}}
    if is_main:
        write_run_config(config, workdir)

    program = TrainProgram.build(config, mesh)
    # Read before the state and the input pipeline take memory: on the CPU the limit is the RAM left.
    memory_limit = memory_plan.device_memory_bytes(jax.local_devices()[0], float(config.device_memory_gib))
    model, abstract_state, shardings = program.model, program.abstract_state, program.shardings
    rng = init_key(config.seed)

    train_iter = data_lib.create_train_iterator(
        config.data,
        seed=config.seed,
        global_batch_size=config.batch_size,
        sharding=mesh_lib.batch_sharding(mesh),
        extra_transforms=copy_paste_transforms(config),
    )
    checkpointer = TrainCheckpointer(root / CHECKPOINT_SUBDIR, keep=config.keep_checkpoints, log=_log)
    latest = checkpointer.latest_step()
    if latest is not None:
        state = checkpointer.restore(latest, abstract_state, train_iter)
        _log(f"resumed from {checkpointer.directory}/{latest} (step {int(state.step)})")
    else:
        variables, origin = initial_variables(config, model, rng)
        state = jax.jit(program.fresh_state, out_shardings=shardings)(variables)
        _log(f"initialised {config.arch} ({origin})")
    if is_main:  # rows of steps after the checkpoint (all, without one) are logged again by this run
        for name in (METRICS_FILE, VALIDATION_LOG_FILE):
            drop_rows_after(root / name, int(state.step))

    train_step = None  # compiled on the first batch, by the memory plan

    writer = MetricWriter(workdir, enabled=is_main)
    validation = data_lib.validation_dataset(config.data)
    gather_replicated = jax.jit(lambda tree: tree, out_shardings=mesh_lib.replicated(mesh))
    predictor = None
    profiler = StepProfiler(ProfileWindow.from_config(config.profile_steps), os.fspath(root / PROFILE_SUBDIR), _log)
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
    if config.data.use_fg_bg and not data_lib.train_stores_fg_bg(config.data):
        _log(
            f"the composition loss is off (comp 0): {config.data.tfds_name} stores no foreground/background for "
            f"train; build it with --tfds_config=estimate_fg_bg (P3M-10k) or --estimate_fg_bg (a folder)"
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
                f"{last_good_checkpoint(checkpointer)} "
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

    def validate(step: int, ema: bool) -> dict:
        """Scores the raw weights (``ema``: their EMA) on the validation slice and logs the means."""
        nonlocal predictor
        variables = local_variables(state, gather_replicated, ema=ema)
        if predictor is None:
            predictor = Predictor(config.arch, variables, options=model_options(config))
        else:
            predictor.variables = variables  # same shapes: the jitted forward is reused
        result = evaluate_split(predictor, validation, config.eval.validation_strategy, config.eval.limit)
        means = result["mean"]
        prefix = "val_ema" if ema else "val"
        writer.write_scalars(step, {f"{prefix}/{k}": v for k, v in means.items()})
        _log(
            f"validation @ {step}{' (EMA weights)' if ema else ''} ({result['count']} images, "
            f"{config.eval.validation_strategy}): "
            + ", ".join(f"{k} {means[k]:.4f}" for k in ("SAD", "MSE", "GRAD", "CONN") if k in means)
        )
        return result

    def run_validation(step: int) -> dict:
        """Validation metrics of the weights the run selects models by; with EMA both sets are scored,
        and the other's means are kept under ``raw_``/``ema_`` names."""
        select_ema = bool(config.eval.select_ema)
        other = validate(step, ema=not select_ema)["mean"] if program.ema_decay > 0 else {}
        result = validate(step, ema=select_ema)  # last: the summary images below show these weights
        means = {**result["mean"], **{f"{'raw' if select_ema else 'ema'}_{k}": v for k, v in other.items()}}
        if is_main and config.num_summary_images:
            images = {}
            for index in range(min(config.num_summary_images, len(validation))):
                example = validation[index]
                alpha = strategies.predict_alpha(
                    predictor, np.asarray(example["image"]), config.eval.validation_strategy
                )
                images[f"validation/{index}"] = summary_panel(example["image"], example["alpha"], alpha)
            writer.write_images(step, images)
            append_row(root / VALIDATION_LOG_FILE, {"step": step, "count": result["count"], **means})
        return means

    if step < config.num_train_steps:
        # Said before the long silence: compiling a real step (with XLA:GPU's autotuning) takes minutes.
        platform = jax.devices()[0].platform
        duration = "seconds to minutes" if platform == "cpu" else f"minutes on a {platform.upper()}"
        _log(
            f"compiling the train step on the first batch ({duration}; persistent compilation cache: "
            f"{jax.config.jax_compilation_cache_dir or 'off'})"
        )
    try:
        while step < config.num_train_steps:
            batch = next(train_iter)
            if train_step is None:
                train_step = memory_plan.plan(
                    lambda setting: program.compile(setting, state, batch),
                    memory_plan.current_setting(config),
                    config.batch_size // mesh.size,
                    memory_limit,
                    _log,
                    CPU_LIMIT_NOTE if mesh.devices.flat[0].platform == "cpu" and not config.device_memory_gib else "",
                )
            profiler.before_step(step + 1)
            state, metrics = train_step(state, batch)
            # P3M-CP: how many samples of the batch got a pasted face (ICP) / replaced features (FCP).
            metrics.update(
                {name: jnp.sum(batch[key], dtype=jnp.float32) for key, name in _CP_COUNTS.items() if key in batch}
            )
            step += 1
            profiler.after_step(step, state)
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
            overdue = jax.process_count() == 1 and time.perf_counter() - meter.start >= PROGRESS_EVERY_S
            if step % config.log_every_steps == 0 or save_now or overdue:
                flush_metrics(step)  # also the NaN guard: nothing non-finite is ever saved
            if save_now or evaluate_now:
                bad_leaf = first_non_finite_leaf(state)
                if bad_leaf is not None:
                    checkpointer.wait()
                    raise NonFiniteLossError(
                        f"non-finite values in {bad_leaf} after step {step}; stopped without saving or "
                        f"scoring them. {last_good_checkpoint(checkpointer)} "
                        f"Lower config.optimizer.learning_rate or set config.optimizer.grad_clip_norm."
                    )
            if evaluate_now:
                last_validation = run_validation(step)
            if save_now:
                # Only a checkpoint validated at its own step carries metrics (and can be "best").
                checkpointer.save(step, state, train_iter, metrics=last_validation if evaluate_now else None)
                writer.flush()  # the logs reach a bucket at least with each checkpoint
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
        profiler.stop(step)  # a run stopped inside the window keeps the trace of its steps
        preemption.restore()
        train_iter.close()
        checkpointer.close()  # waits for a save still in flight
        writer.close()
    return {"step": step, "stopped": stopped, "validation": last_validation, "test": test_results}


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str | os.PathLike, which: str = "best") -> dict:
    """`--mode=eval`: scores the best (or latest) checkpoint of ``workdir`` on the test splits."""
    validate_config(config)
    mesh_lib.initialize_distributed_if_needed()
    root = storage.resolve(workdir)
    workdir = os.fspath(root)
    storage.check_bucket(workdir)
    directory = root / CHECKPOINT_SUBDIR
    if not directory.is_dir():
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
