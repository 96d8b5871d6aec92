"""`python -m p3m_jax.main` / `train_and_evaluate`: the quickstart end to end, exact resume,
preemption, checkpoints across device counts and the NaN guard (config values: test_train_config.py;
P3M-CP: test_train_copy_paste.py).

Runs at 64x64 on a tiny synthetic build. The runs share one configuration of the model and the
optimizer (a constant learning rate, so the step program does not depend on num_train_steps):
the session's persistent compilation cache (tests/conftest.py) compiles the step once.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from loop_helpers import (
    REPO,
    assert_trees_equal,
    final_params,
    run_main,
    start_main,
    tiny_config,
    tiny_main_args,
)
from p3m_jax.train import loop, progress
from p3m_jax.train.checkpointing import CheckpointError, TrainCheckpointer
from train_helpers import use_tiny_model


@pytest.fixture(scope="module", autouse=True)
def stand_in_model(tiny_model):
    """Every test here runs the small stand-in model."""
    yield


@pytest.fixture(scope="module")
def quickstart_run(data_dir, tmp_path_factory):
    """A 4-step quickstart run: train, validate at steps 2 and 4, checkpoint, score the test splits."""
    workdir = tmp_path_factory.mktemp("quickstart")
    result = loop.train_and_evaluate(tiny_config(data_dir), workdir)
    return workdir, result


def test_quickstart_trains_validates_checkpoints_and_scores(quickstart_run):
    workdir, result = quickstart_run
    assert result["stopped"] == "finished" and result["step"] == 4
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["train/loss"]) for r in train_rows)
    assert all(r["train/images_per_second"] > 0 for r in train_rows[1:])  # step 1 also compiles
    assert {"train/global", "train/local", "train/fusion", "train/composition", "train/learning_rate"} <= set(
        train_rows[0]
    )
    assert [r["step"] for r in rows if "val/SAD" in r] == [2, 4]
    assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard event file"
    tests = json.loads((workdir / "test_results.json").read_text())
    assert set(tests["splits"]) == {"p3m_500_p", "p3m_500_np"}
    for split in tests["splits"].values():
        assert split["count"] == 2 and np.isfinite(split["mean"]["SAD"])
    assert tests["splits"]["p3m_500_p"]["mean"].get("SAD_PRIVACY") is not None  # facemasks in P


def test_quickstart_second_run_resumes_instead_of_starting_over(quickstart_run, data_dir, capsys):
    workdir, _ = quickstart_run
    resumed = tmp_copy(workdir)
    # What a run killed after its step-4 checkpoint leaves: rows of steps it will redo.
    with open(resumed / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 5, "train/loss": 123.0}) + "\n" + json.dumps({"step": 6}) + "\n")
    with open(resumed / "validation.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 6, "SAD": 1.0}) + "\n")
    result = loop.train_and_evaluate(
        tiny_config(data_dir, num_train_steps=5, eval_every_steps=0, **{"eval.test_splits": ()}), resumed
    )
    out = capsys.readouterr().out
    assert "resumed from" in out and "/4 (step 4)" in out
    assert result["step"] == 5
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "train/loss" in row]
    assert steps == [1, 2, 3, 4, 5]  # steps 1-4 from the first run, only step 5 is new, once
    assert rows[-1]["train/loss"] != 123.0 and max(row["step"] for row in rows) == 5
    assert [json.loads(line)["step"] for line in (resumed / "validation.jsonl").read_text().splitlines()] == [2, 4]
    assert not (resumed / "run.lock").exists()  # released at the end


def test_second_run_on_a_held_workdir_stops_and_a_stale_lock_is_taken_over(quickstart_run, data_dir, capsys):
    from p3m_jax.train.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLockedError

    workdir = tmp_copy(quickstart_run[0])
    config = tiny_config(data_dir, **{"eval.test_splits": ()})  # finished: nothing to train
    holder = WorkdirLock(workdir)
    holder.acquire()
    try:
        with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
            loop.train_and_evaluate(config, workdir)
    finally:
        holder.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (workdir / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "earlier"}))
    assert loop.train_and_evaluate(config, workdir)["stopped"] == "already finished"
    assert (
        f"took over the workdir lock of a run that is gone (host {socket.gethostname()}, pid {dead.pid}"
        in capsys.readouterr().out
    )
    assert not (workdir / LOCK_FILE).exists()


def test_non_finite_batch_statistics_stop_the_run_and_are_never_saved(quickstart_run, data_dir, monkeypatch):
    """The loss stays finite but a running variance turns Inf after step 5 (a good checkpoint at 4):
    the run stops before validating or saving step 6, naming the leaf; 4 stays the best."""
    workdir = tmp_copy(quickstart_run[0])

    def poison(state, metrics):
        stats = jax.tree_util.tree_map(lambda v: v * np.float32(np.inf), state.batch_stats)
        return state.replace(batch_stats=stats), metrics

    change_train_step(monkeypatch, from_step=6, change=poison)
    config = tiny_config(data_dir, num_train_steps=8, **{"eval.test_splits": ()})
    with pytest.raises(
        loop.NonFiniteLossError,
        match=r"non-finite values in batch_stats/.* after step 6.*last good checkpoint is step 4",
    ):
        loop.train_and_evaluate(config, workdir)
    checkpoints = TrainCheckpointer(workdir / "checkpoints", read_only=True)
    assert checkpoints.latest_step() == 4 and checkpoints.best_step() in (2, 4)
    checkpoints.close()
    assert [json.loads(line)["step"] for line in (workdir / "validation.jsonl").read_text().splitlines()] == [2, 4]


@pytest.fixture
def small_filesystem(tmp_path):
    """A tmpfs mount (as root), resizable with ``resize(bytes)``; skipped where mounting is not allowed."""
    mount_point = tmp_path / "small_fs"
    mount_point.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")

    def resize(size):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True)

    try:
        yield mount_point, resize
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_full_disk_is_reported_at_the_next_step_and_a_rerun_with_room_resumes(
    data_dir, small_filesystem, tmp_path, monkeypatch, capsys
):
    mount_point, resize = small_filesystem
    use_tiny_model(monkeypatch, width=192)  # megabytes per checkpoint: the logs are small beside it
    sized = tmp_path / "sized"  # a checkpoint of this model, to size the file system by
    loop.train_and_evaluate(
        tiny_config(data_dir, num_train_steps=2, eval_every_steps=0, **{"eval.test_splits": ()}), sized
    )
    checkpoint_bytes = sum(f.stat().st_size for f in (sized / "checkpoints" / "2").rglob("*") if f.is_file())
    resize(int(1.6 * checkpoint_bytes))  # room for the step-4 checkpoint, not for step 8's as well
    workdir = mount_point / "run"
    config = tiny_config(
        data_dir, num_train_steps=12, eval_every_steps=0, checkpoint_every_steps=4, **{"eval.test_splits": ()}
    )
    with pytest.raises(CheckpointError) as failure:
        loop.train_and_evaluate(config, workdir)
    message = str(failure.value)
    assert message.startswith(f"saving step 8 to {workdir / 'checkpoints'} failed: ")
    assert "No space left on device" in message and "MB free" in message
    assert "the earlier checkpoints are intact (latest: step 4)" in message
    out = capsys.readouterr().out
    assert "may run out of space" in out  # said before the first save
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert 8 <= max(steps) < 12  # stopped steps after the failed save, not at the next save

    resize(int(8 * checkpoint_bytes))
    result = loop.train_and_evaluate(config, workdir)
    assert result == {**result, "stopped": "finished", "step": 12}
    assert "resumed from" in capsys.readouterr().out


def change_train_step(monkeypatch, from_step, change):
    """Makes the loop's train step pass its result through ``change(state, metrics)`` from the
    step that ends at ``from_step`` on."""
    plan = loop.memory_plan.plan  # returns the loop's compiled train step

    def changed(*args, **kwargs):
        step_fn = plan(*args, **kwargs)

        def run(state, batch):
            state, metrics = step_fn(state, batch)
            return change(state, metrics) if int(state.step) >= from_step else (state, metrics)

        return run

    monkeypatch.setattr(loop.memory_plan, "plan", changed)


def tmp_copy(workdir):
    target = pathlib.Path(str(workdir) + f"_copy{time.monotonic_ns()}")
    shutil.copytree(workdir, target)
    return target


def test_load_pretrained_and_eval_mode_use_the_best_checkpoint(quickstart_run, data_dir):
    import p3m_jax

    workdir, _ = quickstart_run
    reader = TrainCheckpointer(workdir / "checkpoints", read_only=True)
    sads = {step: reader.manager.metrics(step)["SAD"] for step in reader.manager.all_steps()}
    best = reader.best_step()
    reader.close()
    assert sads[best] == min(sads.values())
    predictor = p3m_jax.load_pretrained(workdir)
    assert predictor.arch == "resnet34"
    assert_trees_equal(predictor.variables["params"], final_params(workdir, best)["params"])
    assert predictor.forward(np.zeros((1, 64, 64, 3), np.float32))["fusion"].shape == (1, 64, 64, 1)

    results = loop.evaluate_workdir(tiny_config(data_dir), workdir, which="latest")
    assert set(results) == {"p3m_500_p", "p3m_500_np"}
    assert json.loads((workdir / "test_results.json").read_text())["step"] == 4


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(quickstart_run, data_dir, monkeypatch):
    """The loss turns NaN at step 7 (after a good checkpoint at 6): training stops, 6 stays."""
    workdir = tmp_copy(quickstart_run[0])
    change_train_step(
        monkeypatch,
        from_step=7,
        change=lambda state, metrics: (state, {**metrics, "loss": metrics["loss"] * float("nan")}),
    )
    config = tiny_config(
        data_dir,
        num_train_steps=10,
        eval_every_steps=0,
        checkpoint_every_steps=2,
        log_every_steps=5,
        **{"eval.test_splits": ()},
    )
    with pytest.raises(loop.NonFiniteLossError, match="between steps 7 and 8.*last good checkpoint is step 6"):
        loop.train_and_evaluate(config, workdir)
    checkpoints = TrainCheckpointer(workdir / "checkpoints", read_only=True)
    assert checkpoints.latest_step() == 6
    checkpoints.close()
    assert np.isfinite(jax.tree_util.tree_leaves(final_params(workdir, 6))[0]).all()


def test_interrupted_run_resumes_bitwise(quickstart_run, data_dir, tmp_path, monkeypatch):
    """Stopped at step 2 (the preemption path) and resumed == the uninterrupted quickstart run, bit for
    bit (whose validation and checkpoints at step 2 must not disturb training either)."""
    config = tiny_config(data_dir, eval_every_steps=0, checkpoint_every_steps=0, **{"eval.test_splits": ()})
    with monkeypatch.context() as patch:
        patch.setattr(loop.PreemptionWatcher, "should_stop", lambda self, step: step >= 2)
        first = loop.train_and_evaluate(config, tmp_path / "interrupted")
    assert first == {**first, "stopped": "preempted", "step": 2}
    second = loop.train_and_evaluate(config, tmp_path / "interrupted")
    assert second["stopped"] == "finished" and second["step"] == 4
    assert_trees_equal(final_params(tmp_path / "interrupted", 4), final_params(quickstart_run[0], 4))


def test_sigterm_saves_a_checkpoint_that_resumes_and_killed_saves_are_ignored(data_dir, tmp_path):
    workdir = tmp_path / "run"
    fields = {"num_train_steps": 1000, "optimizer.schedule": "constant"}
    args = tiny_main_args(workdir, data_dir, fields)
    process = start_main(args)
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("step 2/"):
                process.send_signal(signal.SIGTERM)
                break
        output = "".join(lines) + process.communicate(timeout=240)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    assert "compiling the train step on the first batch" in output  # said before the first step's wait
    assert "SIGTERM: saved step" in output
    saved = int(output.split("SIGTERM: saved step ")[1].split(";")[0])
    assert saved >= 2
    config = json.loads((workdir / "config.json").read_text())["config"]
    assert config["batch_size"] == 2 and config["data"]["image_size"] == 64  # overrides took effect

    # What a save killed half-way leaves: a temporary folder of a later step. It must be ignored.
    leftover = workdir / "checkpoints" / f"{saved + 5}.orbax-checkpoint-tmp-1234567890"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "partial").write_bytes(b"\0" * 16)
    resumed = run_main(tiny_main_args(workdir, data_dir, {**fields, "num_train_steps": saved + 1}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'}/{saved} (step {saved})" in resumed.stdout
    assert f"step {saved + 1}/{saved + 1}" in resumed.stdout
    assert not leftover.exists()


def _run_until_killed(args, when):
    """Starts `python -m p3m_jax.main ARGS` and SIGKILLs it as soon as ``when(output_lines)`` is
    true (checked every few milliseconds); returns the output up to the kill."""
    import threading

    process = start_main(args)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 240
    try:
        while process.poll() is None and time.time() < deadline:
            if when(lines):
                process.kill()
                break
            time.sleep(0.005)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        reader.join(timeout=10)
    assert process.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    return "".join(lines)


def test_runs_killed_during_a_save_and_after_a_step_resume_bitwise(quickstart_run, data_dir, tmp_path):
    """SIGKILL while a background save is being written, then (in the rerun) right after a
    step; every rerun resumes from the last complete checkpoint (taking over the dead run's
    workdir lock) and the run ends bit for bit where the uninterrupted quickstart run ended."""
    workdir = tmp_path / "killed"
    checkpoints = workdir / "checkpoints"
    args = tiny_main_args(
        workdir,
        data_dir,
        {
            "data.trimap_kernel_range": "(3,5)",
            "num_train_steps": 4,
            "checkpoint_every_steps": 1,
            "optimizer.schedule": "constant",
        },
    )

    def saving(lines):
        return checkpoints.is_dir() and any("orbax-checkpoint-tmp" in p.name for p in checkpoints.iterdir())

    _run_until_killed(args, saving)
    assert (workdir / "run.lock").exists()  # left behind by the killed run
    out = _run_until_killed(args, lambda lines: any(line.startswith("step 3/") for line in lines))
    assert "took over the workdir lock of a run that is gone" in out
    final = run_main(args)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resumed from" in final.stdout and "step 4/4" in final.stdout
    assert_trees_equal(final_params(workdir, 4), final_params(quickstart_run[0], 4))
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # every step logged once


def test_checkpoint_moves_between_device_counts_bitwise(tmp_path):
    """Saved FSDP-sharded on 8 devices, restored on 1 and saved again, restored on 8: bit for bit."""
    worker = str(REPO / "tests" / "checkpoint_worker.py")
    for devices, restore_step, save_step in [(8, 0, 1), (1, 1, 2), (8, 2, 0)]:
        result = subprocess.run(
            [sys.executable, worker, str(tmp_path), str(devices), str(restore_step), str(save_step)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0 and result.stdout.strip().endswith("OK"), (
            f"{devices} devices, restore {restore_step}, save {save_step}:\n{result.stderr[-3000:]}"
        )


def test_profile_steps_trace_the_window_into_the_workdir(data_dir, tmp_path, capsys):
    """config.profile_steps: a trace of those steps under <workdir>/profile, for TensorBoard and Perfetto."""
    config = tiny_config(
        data_dir,
        num_train_steps=3,
        eval_every_steps=0,
        checkpoint_every_steps=0,
        profile_steps="2:3",
        **{"eval.test_splits": ()},
    )
    loop.train_and_evaluate(config, tmp_path / "run")
    profile = tmp_path / "run" / "profile"
    assert list(profile.glob("plugins/profile/*/*.xplane.pb"))  # what TensorBoard's profile tab reads
    assert list(profile.glob("plugins/profile/*/perfetto_trace.json.gz"))
    assert f"profile of steps 2-3 written to {profile}" in capsys.readouterr().out


def test_a_slow_run_prints_progress_on_time_whatever_log_every_steps(data_dir, tmp_path, monkeypatch, capsys):
    """With steps slower than PROGRESS_EVERY_S (here 0 s), every step prints its line although
    log_every_steps is far away."""
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)
    config = tiny_config(
        data_dir, num_train_steps=3, log_every_steps=1000, eval_every_steps=0, checkpoint_every_steps=0
    )
    with config.unlocked():
        config.eval.test_splits = ()
    loop.train_and_evaluate(config, tmp_path / "w")
    out = capsys.readouterr().out
    assert all(f"step {n}/3 |" in out for n in (1, 2, 3)), out
