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
import os
from typing import Any

import jax
import ml_collections

from p3m_jax import data as data_lib
from p3m_jax.common import storage
from p3m_jax.common.constants import (
    CHECKPOINT_SUBDIR,
    METRICS_FILE,
    PROFILE_SUBDIR,
    TEST_RESULTS_FILE,
    VALIDATION_LOG_FILE,
)
from p3m_jax.train import memory_plan
from p3m_jax.train import mesh as mesh_lib
from p3m_jax.train.checkpointing import TrainCheckpointer
from p3m_jax.train.config_checks import ConfigError, check_dataset, validate_config
from p3m_jax.train.guards import NonFiniteLossError, PreemptionWatcher, first_non_finite_leaf, last_good_checkpoint
from p3m_jax.train.run_setup import copy_paste_transforms, initial_variables, prepare_workdir, write_run_config
from p3m_jax.train.program import TrainProgram
from p3m_jax.train.profiling import ProfileWindow, StepProfiler
from p3m_jax.train.progress import Progress
from p3m_jax.train.summary import MetricWriter, drop_rows_after, log as _log
from p3m_jax.train.validation import Validator, evaluate_test_splits
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

CPU_LIMIT_NOTE = " (the machine's available RAM per CPU device; config.device_memory_gib overrides it)"


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


@dataclasses.dataclass
class _Run:
    """What a training run holds between its steps; `_set_up` makes it, `close` releases it."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: Any
    program: TrainProgram
    train_iter: Any
    checkpointer: TrainCheckpointer
    state: Any
    step: int  # the state's step, counted on the host (reading state.step would wait for each step)
    resumed: bool
    writer: MetricWriter
    validator: Validator
    profiler: StepProfiler
    preemption: PreemptionWatcher
    progress: Progress
    memory_limit: int | None
    train_step: Any = None  # compiled on the first batch, by the memory plan
    last_validation: dict = dataclasses.field(default_factory=dict)

    def close(self) -> None:
        self.profiler.stop(self.step)  # a run stopped inside the window keeps the trace of its steps
        self.preemption.restore()
        self.train_iter.close()
        self.checkpointer.close()  # waits for a save still in flight
        self.writer.close()


def _train(config: ml_collections.ConfigDict, workdir: str, mesh, rescore: bool = False) -> dict:
    """Set up, train step by step (validating and saving on the way), then score the test splits."""
    finished = None if rescore else _already_finished(config, workdir)
    if finished is not None:
        _log(
            f"{workdir} holds a finished run (step {finished} of {config.num_train_steps}"
            + (f", test results in {TEST_RESULTS_FILE}" if config.eval.test_splits else "")
            + "): nothing to do. --rescore scores the test splits again; a new --workdir starts a new run."
        )
        return {"step": finished, "stopped": "already finished", "validation": {}, "test": {}}
    run = _set_up(config, workdir, mesh)
    try:
        _announce(run)
        stopped = "finished"
        while run.step < config.num_train_steps:
            _train_one_step(run)
            preempted = run.preemption.should_stop(run.step)
            _validate_and_save(run, preempted)
            if preempted:
                stopped = "preempted"
                _log(f"SIGTERM: saved step {run.step}; run the same command again to resume")
                break
        run.checkpointer.wait()
        run.train_iter.close()
        test_results = {}
        if stopped == "finished" and config.eval.test_splits:
            test_results = evaluate_test_splits(config, run.checkpointer, workdir, run.validator.predictor)
    finally:
        run.close()
    return {"step": run.step, "stopped": stopped, "validation": run.last_validation, "test": test_results}


def _set_up(config: ml_collections.ConfigDict, workdir: str, mesh) -> _Run:
    """The run's program, input iterator, state (resumed from the latest checkpoint, else initialised),
    and the helpers that log, validate, profile and watch for SIGTERM."""
    is_main = jax.process_index() == 0
    root = storage.resolve(workdir)  # the workdir as a path, local or gs://
    if is_main:
        write_run_config(config, workdir)
    program = TrainProgram.build(config, mesh)
    # Read before the state and the input pipeline take memory: on the CPU the limit is the RAM left.
    memory_limit = memory_plan.device_memory_bytes(jax.local_devices()[0], float(config.device_memory_gib))
    train_iter = data_lib.create_train_iterator(
        config.data,
        seed=config.seed,
        global_batch_size=config.batch_size,
        sharding=mesh_lib.batch_sharding(mesh),
        extra_transforms=copy_paste_transforms(config),
    )
    checkpointer = TrainCheckpointer(root / CHECKPOINT_SUBDIR, keep=config.keep_checkpoints, log=_log)
    state, resumed = _restore_or_initialise(config, program, checkpointer, train_iter)
    if is_main:  # rows of steps after the checkpoint (all, without one) are logged again by this run
        for name in (METRICS_FILE, VALIDATION_LOG_FILE):
            drop_rows_after(root / name, int(state.step))
    writer = MetricWriter(workdir, enabled=is_main)
    profile_dir = os.fspath(root / PROFILE_SUBDIR)
    return _Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        program=program,
        train_iter=train_iter,
        checkpointer=checkpointer,
        state=state,
        step=int(state.step),
        resumed=resumed,
        writer=writer,
        validator=Validator(config, mesh, writer, root, ema=program.ema_decay > 0, is_main=is_main),
        profiler=StepProfiler(ProfileWindow.from_config(config.profile_steps), profile_dir, _log),
        preemption=PreemptionWatcher(),
        progress=Progress(config, mesh.size, int(state.step), writer, checkpointer, _log),
        memory_limit=memory_limit,
    )


def _restore_or_initialise(config, program: TrainProgram, checkpointer: TrainCheckpointer, train_iter):
    """(state, resumed): the latest checkpoint with the input iterator's position, else fresh variables."""
    latest = checkpointer.latest_step()
    if latest is not None:
        state = checkpointer.restore(latest, program.abstract_state, train_iter)
        _log(f"resumed from {checkpointer.directory}/{latest} (step {int(state.step)})")
        return state, True
    variables, origin = initial_variables(config, program.model, init_key(config.seed))
    state = jax.jit(program.fresh_state, out_shardings=program.shardings)(variables)
    _log(f"initialised {config.arch} ({origin})")
    return state, False


def _announce(run: _Run) -> None:
    config, mesh = run.config, run.mesh
    _log(
        f"training {config.arch} on {mesh.size} device(s) in {jax.process_count()} process(es), "
        f"global batch {config.batch_size}, steps {run.step} -> {config.num_train_steps}, workdir {run.workdir}"
    )
    if config.data.use_fg_bg and not data_lib.train_stores_fg_bg(config.data):
        _log(
            f"the composition loss is off (comp 0): {config.data.tfds_name} stores no foreground/background for "
            f"train; build it with --tfds_config=estimate_fg_bg (P3M-10k) or --estimate_fg_bg (a folder)"
        )
    if run.step < config.num_train_steps:
        # Said before the long silence: compiling a real step (with XLA:GPU's autotuning) takes minutes.
        platform = mesh.devices.flat[0].platform
        duration = "seconds to minutes" if platform == "cpu" else f"minutes on a {platform.upper()}"
        _log(
            f"compiling the train step on the first batch ({duration}; persistent compilation cache: "
            f"{jax.config.jax_compilation_cache_dir or 'off'})"
        )


def _train_one_step(run: _Run) -> None:
    """One batch through the train step (compiled by the memory plan on the first), metered and profiled;
    a failed background save stops the run here, naming its step."""
    config = run.config
    batch = next(run.train_iter)
    if run.train_step is None:
        cpu_limit = run.mesh.devices.flat[0].platform == "cpu" and not config.device_memory_gib
        run.train_step = memory_plan.plan(
            lambda setting: run.program.compile(setting, run.state, batch),
            memory_plan.current_setting(config),
            config.batch_size // run.mesh.size,
            run.memory_limit,
            _log,
            CPU_LIMIT_NOTE if cpu_limit else "",
        )
    run.profiler.before_step(run.step + 1)
    run.state, metrics = run.train_step(run.state, batch)
    run.step += 1
    run.profiler.after_step(run.step, run.state)
    run.progress.add(metrics, batch)
    run.checkpointer.poll()
    if run.step == run.progress.first_step + 1 and not run.resumed:
        run.writer.write_text(0, {"config": f"```\n{config}\n```"})  # after the compile: no empty event file


def _validate_and_save(run: _Run, preempted: bool) -> None:
    """Reports progress when due, validates every eval_every_steps and at the end, and saves every
    checkpoint_every_steps, at validations, at the end and on SIGTERM; nothing non-finite is validated
    or saved."""
    config, step = run.config, run.step
    is_last = step == config.num_train_steps
    evaluate_now = bool(config.eval_every_steps) and not preempted and (step % config.eval_every_steps == 0 or is_last)
    periodic_save = bool(config.checkpoint_every_steps) and step % config.checkpoint_every_steps == 0
    save_now = is_last or preempted or evaluate_now or periodic_save
    if run.progress.due(step) or save_now:
        run.progress.flush(step)  # also the NaN guard on the loss
    if save_now or evaluate_now:
        bad_leaf = first_non_finite_leaf(run.state)
        if bad_leaf is not None:
            run.checkpointer.wait()
            raise NonFiniteLossError(
                f"non-finite values in {bad_leaf} after step {step}; stopped without saving or "
                f"scoring them. {last_good_checkpoint(run.checkpointer)} "
                f"Lower config.optimizer.learning_rate or set config.optimizer.grad_clip_norm."
            )
    if evaluate_now:
        run.last_validation = run.validator(step, run.state)
    if save_now:
        # Only a checkpoint validated at its own step carries metrics (and can be "best").
        metrics = run.last_validation if evaluate_now else None
        run.checkpointer.save(step, run.state, run.train_iter, metrics=metrics)
        run.writer.flush()  # the logs reach a bucket at least with each checkpoint


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
