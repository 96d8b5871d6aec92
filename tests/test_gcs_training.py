"""Training runs whose workdir and data live in a gs:// bucket, against a real Cloud Storage emulator
(fake-gcs-server on 127.0.0.1, tests/gcs_emulator.py): the synthetic build lands in the bucket, the run
trains, logs, checkpoints and scores there, resumes from there, refuses a second live run, survives a
SIGKILL in the middle of a save, and writes nothing under the current folder. Runs the stand-in model
(tests/train_helpers.py): these tests are about where the files go."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from gcs_emulator import GcsEmulator, use_emulator
from loop_helpers import assert_trees_equal, final_params, run_main, start_main, tiny_config, tiny_main_args
from p3m_jax.train import loop
from p3m_jax.train.workdir_lock import WorkdirLock


@pytest.fixture(scope="module")
def emulator():
    server = GcsEmulator()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bucket(emulator):
    """A fresh bucket for this module, with this process pointed at the emulator."""
    with pytest.MonkeyPatch.context() as patch:
        use_emulator(patch, emulator)
        yield emulator.new_bucket()


@pytest.fixture(scope="module", autouse=True)
def stand_in_model(tiny_model):
    yield


@pytest.fixture(scope="module")
def bucket_run(emulator, bucket, tmp_path_factory):
    """The 4-step quickstart with workdir and data_dir in the bucket, run from an empty current folder."""
    here = tmp_path_factory.mktemp("cwd")
    previous = os.getcwd()
    os.chdir(here)
    try:
        config = tiny_config(f"gs://{bucket}/tfds")
        result = loop.train_and_evaluate(config, f"gs://{bucket}/runs/quickstart")
    finally:
        os.chdir(previous)
    return result, here


def test_quickstart_in_a_bucket_builds_trains_and_writes_only_there(emulator, bucket, bucket_run):
    result, here = bucket_run
    assert result["stopped"] == "finished" and result["step"] == 4
    assert list(here.iterdir()) == [], "a gs:// run wrote under the current folder"
    objects = emulator.objects(bucket)
    built = [name for name in objects if name.startswith("tfds/p3m10k/synthetic_64x64_12_2_2/1.0.0/")]
    assert any(name.endswith("dataset_info.json") for name in built)
    assert any(".array_record-" in name for name in built)
    run = [name[len("runs/quickstart/") :] for name in objects if name.startswith("runs/quickstart/")]
    for name in ("config.json", "metrics.jsonl", "validation.jsonl", "test_results.json"):
        assert name in run, f"{name} missing from the bucket: {run}"
    assert any(name.startswith("events.out.tfevents.") for name in run)
    assert {name.split("/")[1] for name in run if name.startswith("checkpoints/")} >= {"2", "4"}
    assert "run.lock" not in run  # released at the end


def test_bucket_logs_hold_every_step_and_the_test_scores(bucket, bucket_run):
    from etils import epath

    workdir = epath.Path(f"gs://{bucket}/runs/quickstart")
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in (workdir / "validation.jsonl").read_text().splitlines()] == [2, 4]
    tests = json.loads((workdir / "test_results.json").read_text())
    assert set(tests["splits"]) == {"p3m_500_p", "p3m_500_np"}


def test_second_run_resumes_from_the_bucket(bucket, bucket_run, capsys):
    config = tiny_config(f"gs://{bucket}/tfds", num_train_steps=6)
    result = loop.train_and_evaluate(config, f"gs://{bucket}/runs/quickstart")
    out = capsys.readouterr().out
    assert f"resumed from gs://{bucket}/runs/quickstart/checkpoints/4 (step 4)" in out
    assert result["step"] == 6 and result["stopped"] == "finished"


def test_second_live_run_on_a_bucket_workdir_is_refused(emulator, bucket):
    workdir = f"gs://{bucket}/runs/locked"
    holder = WorkdirLock(workdir)
    holder.acquire()
    try:
        result = run_main(tiny_main_args(workdir, f"gs://{bucket}/tfds", {"num_train_steps": 1}), emulator.environment())
    finally:
        holder.release()
    assert result.returncode != 0
    assert "in use by another training run" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_killed_during_a_save_resumes_bitwise_from_the_bucket(emulator, bucket, bucket_run):
    """SIGKILL right after a step whose checkpoint is being written (one save per step), then a rerun:
    it takes over the dead run's lock, resumes from the last complete checkpoint in the bucket, and
    ends bit for bit where the uninterrupted run ended."""
    workdir = f"gs://{bucket}/runs/killed"
    fields = {
        "data.trimap_kernel_range": "(3,5)",
        "num_train_steps": 4,
        "checkpoint_every_steps": 1,
        "optimizer.schedule": "constant",
    }
    args = tiny_main_args(workdir, f"gs://{bucket}/tfds", fields)
    env = emulator.environment()
    process = start_main(args)  # the bucket fixture put the emulator's variables in this environment
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while process.poll() is None and time.time() < deadline:
        if any(line.startswith("step 3/") for line in lines):
            process.kill()  # step 2's save may still be in flight, step 3's has just started
            break
        time.sleep(0.005)
    process.wait()
    reader.join(timeout=10)
    assert process.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    final = run_main(args, env)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "took over the workdir lock of a run that is gone" in final.stdout + final.stderr
    assert "resumed from" in final.stdout and "step 4/4" in final.stdout
    assert_trees_equal(final_params(workdir, 4), final_params(f"gs://{bucket}/runs/quickstart", 4))


def test_missing_bucket_and_unreachable_emulator_are_one_line(emulator, bucket):
    missing = run_main(
        tiny_main_args("gs://no-such-bucket-p3m/run", f"gs://{bucket}/tfds", {"num_train_steps": 1}),
        emulator.environment(),
    )
    assert missing.returncode != 0
    assert "bucket gs://no-such-bucket-p3m does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    closed = f"http://127.0.0.1:{_closed_port()}"
    env = {**emulator.environment(), "STORAGE_EMULATOR_HOST": closed}
    down = run_main(tiny_main_args(f"gs://{bucket}/run", f"gs://{bucket}/tfds", {"num_train_steps": 1}), env)
    assert down.returncode != 0
    assert f"cannot reach Cloud Storage at {closed}" in down.stderr
    assert "Traceback" not in down.stderr


def _closed_port() -> int:
    from gcs_emulator import free_port

    return free_port()  # free: nothing listens there
