"""Runs whose workdir, data and outputs live in a gs:// bucket, against a real Cloud Storage emulator
(fake-gcs-server on 127.0.0.1, tests/gcs_emulator.py), with a fresh bucket for this module.

Training: the synthetic build lands in the bucket, the run trains, logs, checkpoints and scores there,
resumes from there, refuses a second live run, survives a SIGKILL in the middle of a save, and writes
nothing under the current folder. The commands: predict, evaluate and export read the run's checkpoint
and photos from the bucket and write their outputs there; the builder writes a folder dataset there and
training reads it. Runs the stand-in model (tests/train_helpers.py): these tests are about where the
files go."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from etils import epath
from PIL import Image

from gcs_emulator import GcsEmulator, use_emulator
from loop_helpers import REPO, assert_trees_equal, final_params, run_main, start_main, tiny_config, tiny_main_args
from p3m_jax import evaluate, export, predict
from p3m_jax.train import loop
from p3m_jax.train.workdir_lock import WorkdirLock
from tfds_p3m10k import build


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
        result = run_main(
            tiny_main_args(workdir, f"gs://{bucket}/tfds", {"num_train_steps": 1}), emulator.environment()
        )
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


def _photo(seed: int, height: int = 48, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png_bytes(array) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_predict_reads_a_bucket_checkpoint_and_photos_and_writes_the_same_files_there(bucket, bucket_run, tmp_path):
    photos = {f"p{i}.png": _photo(i) for i in range(2)}
    local_in = tmp_path / "photos"
    local_in.mkdir()
    for name, array in photos.items():
        (epath.Path(f"gs://{bucket}/photos") / name).write_bytes(_png_bytes(array))
        Image.fromarray(array).save(local_in / name)
    workdir = f"gs://{bucket}/runs/quickstart"
    common = ["--checkpoint", workdir, "--strategy", "resize", "--cache_dir", str(tmp_path / "cache")]
    args = ["--foreground", "estimate", "--background", "white"]
    assert predict.main([*common, *args, "--input", f"gs://{bucket}/photos", "--output", f"gs://{bucket}/mattes"]) == 0
    assert predict.main([*common, *args, "--input", str(local_in), "--output", str(tmp_path / "mattes")]) == 0
    for name in ("p0_alpha.png", "p0_rgba.png", "p0_composite.png", "p1_alpha.png"):
        remote = (epath.Path(f"gs://{bucket}/mattes") / name).read_bytes()
        assert remote == (tmp_path / "mattes" / name).read_bytes(), name


def test_evaluate_reads_the_bucket_dataset_and_writes_its_report_there(bucket, bucket_run, tmp_path):
    output = f"gs://{bucket}/eval"
    code = evaluate.main(
        [
            *("--checkpoint", f"gs://{bucket}/runs/quickstart", "--data_dir", f"gs://{bucket}/tfds"),
            *("--tfds_config", "p3m10k/synthetic_64x64_12_2_2", "--split", "p3m_500_p", "--strategy", "resize"),
            *("--output", output, "--save_png", "--cache_dir", str(tmp_path / "cache")),
        ]
    )
    assert code == 0
    report = json.loads((epath.Path(output) / "evaluation.json").read_text())
    assert report["splits"]["p3m_500_p"]["count"] == 2
    assert len(list((epath.Path(output) / "p3m_500_p").iterdir())) == 2  # the 8-bit mattes


def test_export_writes_to_a_bucket_and_predict_runs_the_file_from_there(bucket, bucket_run, tmp_path):
    exported = f"gs://{bucket}/exports/model.stablehlo"
    checkpoint = f"gs://{bucket}/runs/quickstart"
    assert (
        export.main(["--checkpoint", checkpoint, "--format", "stablehlo", "--size", "64x64", "--output", exported]) == 0
    )
    photo = tmp_path / "photo.png"
    Image.fromarray(_photo(7, 64, 64)).save(photo)
    out = tmp_path / "out"
    assert (
        predict.main(["--exported", exported, "--input", str(photo), "--output", str(out), "--strategy", "resize"]) == 0
    )
    assert (out / "photo_alpha.png").is_file()


def test_a_folder_build_lands_in_the_bucket_and_training_reads_it(emulator, bucket, tmp_path, capsys):
    folder = tmp_path / "portraits"
    for split, count in (("train", 6), ("test", 2)):
        for i in range(count):
            rng = np.random.default_rng(10 * i + len(split))
            (folder / split / "images").mkdir(parents=True, exist_ok=True)
            (folder / split / "alphas").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                folder / split / "images" / f"{i}.png"
            )
            alpha = np.zeros((64, 64), np.uint8)
            alpha[16:56, 20:44] = 255
            alpha[14:16, 20:44] = 128
            Image.fromarray(alpha).save(folder / split / "alphas" / f"{i}.png")
    data_dir = f"gs://{bucket}/folders"
    args = ["--folder", str(folder), "--name", "mine", "--data_dir", data_dir, "--num_workers", "1"]
    assert build.main(args) == 0
    assert f"portrait_folder/mine in {data_dir}" in capsys.readouterr().out
    built = emulator.objects(bucket, "folders/portrait_folder/mine/")
    assert any(n.endswith("/dataset_info.json") for n in built) and any(".array_record-" in n for n in built)
    assert build.main(args) == 0
    assert "already built, reused" in capsys.readouterr().out
    config = tiny_config(
        data_dir,
        num_train_steps=2,
        eval_every_steps=0,
        checkpoint_every_steps=0,
        **{"data.tfds_name": "portrait_folder/mine", "eval.test_splits": ("test",), "eval.strategy": "resize"},
    )
    result = loop.train_and_evaluate(config, f"gs://{bucket}/runs/mine")
    assert result["step"] == 2 and result["test"]["test"]["count"] == 2


def test_builder_and_commands_name_a_missing_bucket_in_one_line(emulator, bucket, tmp_path, capsys):
    assert build.main(["--tfds_config", "synthetic", "--data_dir", "gs://no-such-bucket-p3m/tfds"]) == 2
    assert (
        predict.main(
            [
                "--checkpoint",
                "gs://no-such-bucket-p3m/run",
                "--input",
                "gs://no-such-bucket-p3m/x",
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("bucket gs://no-such-bucket-p3m does not exist") == 2, err
    assert not (tmp_path / "out").exists()


def test_two_processes_train_and_resume_on_one_bucket_workdir(emulator, bucket, bucket_run):
    """Two local jax.distributed processes (gloo, 2 CPU devices each) on one gs:// workdir: process 0
    alone writes the logs and holds the lock; both save the checkpoint and both restore it."""
    from gcs_emulator import free_port

    workdir = f"gs://{bucket}/runs/two_processes"

    def run_both(steps):
        port = free_port()
        fields = {
            "batch_size": 4,
            "num_train_steps": steps,
            "checkpoint_every_steps": 2,
            "optimizer.schedule": "constant",
        }
        args = tiny_main_args(workdir, f"gs://{bucket}/tfds", fields)
        processes = []
        for index in range(2):
            env = {
                **emulator.environment(),
                "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(index),
                "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
                "JAX_NUM_CPU_DEVICES": "2",
            }
            os.environ.update(env)
            processes.append(start_main(args))
        outputs = [p.communicate(timeout=300)[0] for p in processes]
        assert [p.returncode for p in processes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
        return outputs

    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        assert key not in os.environ
    try:
        first = run_both(2)
        assert "training" in first[0] and "4 device(s) in 2 process(es)" in first[0]
        assert "step 2/2" in first[0] and "step 2/2" not in first[1]  # only process 0 logs
        second = run_both(3)
    finally:
        for key in (
            "JAX_COORDINATOR_ADDRESS",
            "JAX_NUM_PROCESSES",
            "JAX_PROCESS_ID",
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION",
            "JAX_NUM_CPU_DEVICES",
        ):
            os.environ.pop(key, None)
    assert f"resumed from {workdir}/checkpoints/2 (step 2)" in second[0]
    rows = [json.loads(line) for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
    assert "run.lock" not in [p.name for p in epath.Path(workdir).iterdir()]


def test_no_credentials_at_all_say_how_to_authenticate(tmp_path):
    """Without an emulator, credentials or a metadata server, writing to a bucket stops before any
    request, saying how to authenticate."""
    photo = tmp_path / "photo.png"
    Image.fromarray(_photo(3)).save(photo)
    env = {k: v for k, v in os.environ.items() if "STORAGE" not in k and k not in ("GOOGLE_APPLICATION_CREDENTIALS",)}
    env.update(
        HOME=str(tmp_path),
        CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
        NO_GCE_CHECK="true",
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
        PYTHONPATH=str(REPO),
    )
    command = ["-m", "p3m_jax.predict", "--checkpoint", str(tmp_path / "none"), "--input", str(photo)]
    result = subprocess.run(
        [sys.executable, *command, "--output", "gs://some-bucket/mattes"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "no Google Cloud credentials found" in result.stderr
    assert "gcloud auth application-default login" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_benchmark_folder_in_a_bucket_is_built_and_scored(emulator, bucket, bucket_run, tmp_path, capsys):
    """--folder and evaluate's layout folders read from gs:// (through a local copy)."""
    remote = epath.Path(f"gs://{bucket}/benchmarks/bench")
    for i in range(3):
        rng = np.random.default_rng(100 + i)
        (remote / "images" / f"{i}.png").write_bytes(_png_bytes(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
        alpha = np.zeros((64, 64), np.uint8)
        alpha[16:56, 20:44] = 255
        (remote / "alphas" / f"{i}.png").write_bytes(_png_bytes(alpha))
    args = ["--folder", os.fspath(remote), "--data_dir", str(tmp_path / "tfds"), "--num_workers", "1"]
    assert build.main([*args, "--split_fractions", "test=1.0"]) == 0
    assert "portrait_folder/bench in" in capsys.readouterr().out
    code = evaluate.main(
        [
            *("--checkpoint", f"gs://{bucket}/runs/quickstart", "--data_dir", os.fspath(remote)),
            *("--layout", "folder", "--strategy", "resize", "--cache_dir", str(tmp_path / "cache")),
        ]
    )
    assert code == 0
    assert "copied gs://" in capsys.readouterr().out
