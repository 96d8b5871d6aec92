"""One training run per workdir: the lock refuses a live holder and takes over a dead one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from p3m_jax.train.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLockedError


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(workdir, holder, age_s=0.0):
    path = workdir / LOCK_FILE
    path.write_text(json.dumps(holder))
    if age_s:
        past = time.time() - age_s
        os.utime(path, (past, past))
    return path


def test_second_lock_on_a_held_workdir_is_refused_naming_the_holder(tmp_path):
    first = WorkdirLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(
            WorkdirLockedError,
            match=rf"in use by another training run \(host "
            rf"{socket.gethostname()}, pid {os.getpid()}, started",
        ):
            WorkdirLock(tmp_path).acquire()
    finally:
        first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    second = WorkdirLock(tmp_path)
    second.acquire()  # free again once released
    second.release()


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, {"host": socket.gethostname(), "pid": pid, "started": "earlier"})
    messages = []
    lock = WorkdirLock(tmp_path, log=messages.append)
    lock.acquire()
    try:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert len(messages) == 1 and f"pid {pid} is not running" in messages[0]
    finally:
        lock.release()


def test_lock_from_another_host_is_stale_only_when_not_refreshed(tmp_path):
    holder = {"host": "some-other-host", "pid": 1, "started": "earlier"}
    write_lock(tmp_path, holder, age_s=5)
    with pytest.raises(WorkdirLockedError, match="some-other-host"):
        WorkdirLock(tmp_path, stale_after_s=60).acquire()
    write_lock(tmp_path, holder, age_s=120)
    messages = []
    lock = WorkdirLock(tmp_path, stale_after_s=60, log=messages.append)
    lock.acquire()
    lock.release()
    assert "not refreshed for" in messages[0]


def test_held_lock_is_refreshed_while_the_run_lives(tmp_path):
    lock = WorkdirLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    try:
        path = tmp_path / LOCK_FILE
        past = time.time() - 1000
        os.utime(path, (past, past))
        deadline = time.time() + 5
        while os.stat(path).st_mtime < time.time() - 100 and time.time() < deadline:
            time.sleep(0.05)
        assert os.stat(path).st_mtime > time.time() - 100
    finally:
        lock.release()


def test_release_leaves_a_lock_that_another_run_took(tmp_path):
    lock = WorkdirLock(tmp_path)
    lock.acquire()
    write_lock(tmp_path, {"host": "other", "pid": 2, "started": "later"})
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "other"
