"""Faults users meet, reproduced without mount rights so that they run on every machine (tests that use
a real tmpfs or a read-only bind mount, and skip without them, live in test_train_loop.py and
test_predict.py): a disk that fills up during training, and an output folder the user may not write."""

from __future__ import annotations

import builtins
import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from loop_helpers import REPO, tiny_config
from p3m_jax.train import loop
from p3m_jax.train.checkpointing import CheckpointError

FULL_FROM_STEP = 8  # the first checkpoint that finds the disk full
FREE_BYTES = 4096  # what the fake statvfs reports free: below what any checkpoint needs


@pytest.fixture(scope="module", autouse=True)
def stand_in_model(tiny_model):
    yield


def _fill_disk_at(monkeypatch, checkpoints: str) -> None:
    """A disk that is full for ``checkpoints``: statvfs (read by the run's free-space check) reports
    FREE_BYTES free under it, and every file written for checkpoint FULL_FROM_STEP or later fails with
    ENOSPC when opened, as on a full file system (orbax writes a checkpoint's metadata and the data
    iterator's state through Python's open; its arrays alone go through tensorstore)."""
    real_statvfs, real_open = os.statvfs, builtins.open

    def statvfs(path):
        result = real_statvfs(path)
        if not os.path.abspath(os.fspath(path)).startswith(checkpoints):
            return result
        # (f_bsize, f_frsize, f_blocks, f_bfree, f_bavail, f_files, f_ffree, f_favail, f_flag, f_namemax)
        fields = list(result)[:10]
        fields[1], fields[3], fields[4] = 1, FREE_BYTES, FREE_BYTES
        return os.statvfs_result(fields)

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+"):
            path = os.path.abspath(os.fspath(file))
            if path.startswith(checkpoints + os.sep):
                step = re.match(r"\d+", os.path.relpath(path, checkpoints))  # "8.orbax-checkpoint-tmp/..."
                if step and int(step.group()) >= FULL_FROM_STEP:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "statvfs", statvfs)
    monkeypatch.setattr(builtins, "open", open_)


def test_a_disk_that_fills_up_is_reported_with_the_space_needed_and_a_rerun_resumes(
    data_dir, tmp_path, monkeypatch, capsys
):
    workdir = tmp_path / "run"
    config = tiny_config(
        data_dir, num_train_steps=12, eval_every_steps=0, checkpoint_every_steps=4, **{"eval.test_splits": ()}
    )
    with monkeypatch.context() as patch:
        _fill_disk_at(patch, str(workdir / "checkpoints"))
        with pytest.raises(CheckpointError) as failure:
            loop.train_and_evaluate(config, workdir)
    message = str(failure.value)
    assert message.startswith(f"saving step 8 to {workdir / 'checkpoints'} failed: "), message
    assert "No space left on device" in message and "; 0 MB free" in message, message
    assert "the earlier checkpoints are intact (latest: step 4)" in message, message
    assert "may run out of space" in capsys.readouterr().out  # said before the first save
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert 8 <= max(steps) < 12  # stopped a step or so after the failed save, not at the next save

    # With room again the same command resumes from step 4 and finishes.
    result = loop.train_and_evaluate(config, workdir)
    assert result == {**result, "stopped": "finished", "step": 12}
    assert "resumed from" in capsys.readouterr().out


# Runs predict into the folder (its check comes before the checkpoint is read, so none is needed) and the
# training run's workdir check on a folder inside it, as an unprivileged user when started as root.
_UNPRIVILEGED = """
import os, sys
from p3m_jax import predict
from p3m_jax.train import loop
if os.geteuid() == 0:  # root writes anywhere: become nobody (imports done first: the repo may be root's)
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
image, folder = sys.argv[1:]
code = predict.main(["--checkpoint", "none", "--input", image, "--output", folder, "--cache_dir", ""])
print("predict exit", code, flush=True)
try:
    loop.prepare_workdir(os.path.join(folder, "run"))  # the training run's check of its workdir
except OSError as error:
    print(f"error: {error}", file=sys.stderr)
"""


def test_an_output_folder_the_user_may_not_write_is_reported_at_once():
    """A folder of another user (root's, seen by nobody) or one without write permission (seen by a
    non-root owner): predict and the training run each say so in one line, before loading anything."""
    shared = tempfile.mkdtemp(prefix="p3m_unwritable_")  # outside pytest's root-only folders
    try:
        os.chmod(shared, 0o755)
        image = os.path.join(shared, "a.png")
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
        os.chmod(image, 0o644)
        folder = os.path.join(shared, "out")
        os.mkdir(folder)
        os.chmod(folder, 0o555)
        result = subprocess.run(
            [sys.executable, "-c", _UNPRIVILEGED, image, folder],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=300,
        )
        assert "predict exit 2" in result.stdout, result.stdout + result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert errors == [
            f"error: output folder {folder} is not writable: Permission denied",
            f"error: workdir {os.path.join(folder, 'run')} is not writable: Permission denied",
        ], result.stderr
        assert os.listdir(folder) == []
    finally:
        os.chmod(shared, 0o755)
        shutil.rmtree(shared)


def test_orbax_errors_of_a_save_are_held_while_it_runs_and_reported_not_dropped(caplog):
    """orbax's ERROR records (one traceback per background thread of a failed save) are held back only
    while a save is in flight: a failed save names them in its error, a save that succeeds logs them."""
    from p3m_jax.train import checkpointing

    absl = logging.getLogger("absl")
    orbax_file = os.path.join("site-packages", "orbax", "checkpoint", "_src", "save.py")

    def orbax_error(message):
        absl.handle(absl.makeRecord("absl", logging.ERROR, orbax_file, 1, message, None, None))

    with caplog.at_level(logging.INFO, logger="absl"):
        held = checkpointing._SaveErrorLog()  # pylint: disable=protected-access
        orbax_error("Save failed: [Errno 28] No space left on device\nTraceback ...")
        absl.error("not orbax's")
        note = held.close(failed=True)
        orbax_error("after the save")
        held = checkpointing._SaveErrorLog()  # pylint: disable=protected-access
        orbax_error("logged by a save that then succeeded")
        assert [r.getMessage() for r in caplog.records] == ["not orbax's", "after the save"]
        held.close(failed=False)
    assert (
        note
        == " (orbax logged 1 error(s) from the save's threads; the first: Save failed: [Errno 28] No space left on device)"
    )
    assert caplog.records[-1].getMessage() == "logged by a save that then succeeded"
