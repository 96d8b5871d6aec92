"""One training run per workdir: ``<workdir>/run.lock``.

The lock is created only if absent (``O_CREAT | O_EXCL`` on a disk; a ``gs://`` object uploaded with
the precondition "no live generation", ``ifGenerationMatch=0``) and holds the holder's host, pid and
start time as JSON; while the run lives, a background thread refreshes it (a file's modification
time; an object's metadata, on the condition that its generation is still the holder's).
A second run on the same workdir stops at once with `WorkdirLockedError` naming the holder.
A lock left by a killed run is taken over (with a log line) when it is stale:

- on this host, when its pid is no longer running;
- from another host (shared storage, a bucket), when it has not been refreshed for ``stale_after_s``.

Of two runs taking over the same stale lock, one wins: a file is renamed aside (atomic), an object is
deleted by its generation (only one deletion of that generation succeeds).

In a multi-process run only process 0 takes the lock, and every process learns the outcome
(`acquire_for_run`), so all of them stop together.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
from typing import Any, Callable

from p3m_jax.common import storage

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # 20 missed heartbeats: the holder on another host is gone


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir (the message names its host, pid and start time)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


class _LockFile:
    """The lock as a file on a local or shared disk."""

    def __init__(self, path: str):
        self.path = path

    def create(self, content: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        return True

    def read(self) -> tuple[bytes, float, Any] | None:
        """(content, seconds since the last refresh, a token naming this version) or None when absent."""
        try:
            with open(self.path, "rb") as f:
                content = f.read()
            return content, time.time() - os.stat(self.path).st_mtime, None
        except FileNotFoundError:
            return None

    def remove_stale(self, token) -> bool:
        """Removes the lock file; False when another process removed or replaced it first."""
        aside = f"{self.path}.stale.{os.getpid()}"
        try:
            os.rename(self.path, aside)  # atomic: of two runs taking over, one renames it
        except FileNotFoundError:
            return False
        os.remove(aside)
        return True

    def refresh(self) -> None:
        os.utime(self.path)

    def remove(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


class _LockObject:
    """The lock as a Cloud Storage object; every change is conditional on the object's generation."""

    def __init__(self, path: str):
        self.path = path
        self.fs = storage.gcs_filesystem()
        self.bucket, _, self.key = path[len(storage.GCS_SCHEME) :].partition("/")
        self.generation: str | None = None  # of the object this process created

    def create(self, content: bytes) -> bool:
        try:
            self.fs.pipe_file(f"{self.bucket}/{self.key}", content, mode="create")
        except FileExistsError:
            return False
        self.generation = self._info()["generation"]
        return True

    def _info(self) -> dict:
        return self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)

    def read(self) -> tuple[bytes, float, Any] | None:
        try:
            info = self._info()
            content = self.fs.cat_file(f"{self.bucket}/{self.key}", generation=info["generation"])
        except FileNotFoundError:
            return None
        # The last refresh: the object's update time, or the heartbeat its holder wrote in its metadata.
        refreshed = datetime.datetime.fromisoformat(info["updated"].replace("Z", "+00:00")).timestamp()
        try:
            refreshed = max(refreshed, float(info.get("metadata", {}).get("heartbeat", 0.0)))
        except ValueError:
            pass
        return content, time.time() - refreshed, info["generation"]

    def remove_stale(self, token) -> bool:
        try:
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=token)
        except (FileNotFoundError, OSError):
            return False  # gone, or replaced by a run that took it over first
        return True

    def refresh(self) -> None:
        self.fs.call(
            "PATCH",
            "b/{}/o/{}",
            self.bucket,
            self.key,
            ifGenerationMatch=self.generation,
            json={"metadata": {"heartbeat": str(time.time())}},
            json_out=True,
        )

    def remove(self) -> None:
        try:
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=self.generation)
        except (FileNotFoundError, OSError):
            pass


class WorkdirLock:
    """The lock of one workdir (local or ``gs://``); `acquire` takes it (or raises), `release` gives it back."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        stale_after_s: float = STALE_AFTER_S,
        heartbeat_s: float = HEARTBEAT_S,
        log: Callable[[str], None] = print,
    ):
        workdir = os.fspath(workdir)
        self.path = f"{workdir.rstrip('/')}/{LOCK_FILE}" if "://" in workdir else os.path.join(workdir, LOCK_FILE)
        self._store = _LockObject(self.path) if storage.is_remote(workdir) else _LockFile(self.path)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.log = log
        self._me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> tuple[dict, float, Any] | None:
        """(holder, seconds since its last refresh, version token), or None when there is no lock."""
        found = self._store.read()
        if found is None:
            return None
        content, age, token = found
        try:
            holder = json.loads(content)
        except ValueError:
            holder = {}  # half-written or unreadable: judged by its age alone
        return (holder if isinstance(holder, dict) else {}), age, token

    def _stale_reason(self, holder: dict, age: float) -> str | None:
        """Why the lock ``holder`` wrote is stale, or None while its run may be alive."""
        if holder.get("host") == self._me["host"] and isinstance(holder.get("pid"), int):
            return None if _pid_alive(holder["pid"]) else f"pid {holder['pid']} is not running"
        if age > self.stale_after_s:
            return f"not refreshed for {age:.0f} s"
        return None

    def acquire(self) -> None:
        """Takes the lock, taking over a stale one; raises WorkdirLockedError if it is held."""
        for _ in range(3):  # a concurrent release or takeover can change the lock between looks
            if self._store.create(json.dumps(self._me).encode("utf-8")):
                self._start_heartbeat()
                return
            found = self._read()
            if found is None:
                continue
            holder, age, token = found
            reason = self._stale_reason(holder, age)
            if reason is None:
                raise WorkdirLockedError(
                    f"{self.path.rsplit('/', 1)[0]} is in use by another training run ({_describe(holder)}); "
                    f"wait for it to finish or stop it, or use another --workdir. If no such run exists, "
                    f"delete {self.path}"
                )
            if self._store.remove_stale(token):
                self.log(f"took over the workdir lock of a run that is gone ({_describe(holder)}: {reason})")
        raise WorkdirLockedError(f"could not take the workdir lock {self.path}: it keeps changing")

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                try:
                    self._store.refresh()
                except OSError:
                    pass  # a vanished lock is noticed by whoever looks at it next

        self._thread = threading.Thread(target=beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Removes the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            found = self._read()
            if found is not None and found[0] == self._me:
                self._store.remove()


def acquire_for_run(workdir: str, log: Callable[[str], None]) -> WorkdirLock | None:
    """Process 0 takes ``workdir``'s lock; every process raises WorkdirLockedError if it could not.

    Returns the lock on process 0 (to release at the end), None on the others.
    """
    import jax  # pylint: disable=import-outside-toplevel

    lock, message = None, ""
    if jax.process_index() == 0:
        lock = WorkdirLock(workdir, log=log)
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            lock, message = None, str(e)
    if jax.process_count() > 1:
        import numpy as np  # pylint: disable=import-outside-toplevel
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

        held = multihost_utils.broadcast_one_to_all(np.int32(0 if message else 1))
        if not int(held):
            message = message or f"{workdir} is in use by another training run (see process 0's message)"
    if message:
        raise WorkdirLockedError(message)
    return lock
