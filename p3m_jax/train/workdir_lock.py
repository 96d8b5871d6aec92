"""One training run per workdir: ``<workdir>/run.lock``.

The lock file is created atomically (``O_CREAT | O_EXCL``) and holds the holder's host, pid and
start time as JSON; while the run lives, a background thread refreshes its modification time.
A second run on the same workdir stops at once with `WorkdirLockedError` naming the holder.
A lock left by a killed run is taken over (with a log line) when it is stale:

- on this host, when its pid is no longer running;
- from another host (shared storage), when it has not been refreshed for ``stale_after_s``.

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
from typing import Callable

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


class WorkdirLock:
    """The lock of one workdir; `acquire` takes it (or raises), `release` gives it back."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        stale_after_s: float = STALE_AFTER_S,
        heartbeat_s: float = HEARTBEAT_S,
        log: Callable[[str], None] = print,
    ):
        self.path = os.path.join(os.fspath(workdir), LOCK_FILE)
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

    def _read(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written or unreadable: judged by its age alone

    def _stale_reason(self, holder: dict) -> str | None:
        """Why the lock ``holder`` wrote is stale, or None while its run may be alive."""
        if holder.get("host") == self._me["host"] and isinstance(holder.get("pid"), int):
            return None if _pid_alive(holder["pid"]) else f"pid {holder['pid']} is not running"
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return "it was just released"
        if age > self.stale_after_s:
            return f"not refreshed for {age:.0f} s"
        return None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self._me, f)
        return True

    def acquire(self) -> None:
        """Takes the lock, taking over a stale one; raises WorkdirLockedError if it is held."""
        for _ in range(3):  # a concurrent release or takeover can change the file between looks
            if self._create():
                self._start_heartbeat()
                return
            holder = self._read()
            if holder is None:
                continue
            reason = self._stale_reason(holder)
            if reason is None:
                raise WorkdirLockedError(
                    f"{os.path.dirname(self.path)} is in use by another training run ({_describe(holder)}); "
                    f"wait for it to finish or stop it, or use another --workdir. If no such run exists, "
                    f"delete {self.path}"
                )
            # Renaming is atomic: of two runs taking over the same stale lock, one wins.
            aside = f"{self.path}.stale.{os.getpid()}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            os.remove(aside)
            self.log(f"took over the workdir lock of a run that is gone ({_describe(holder)}: {reason})")
        raise WorkdirLockedError(f"could not take the workdir lock {self.path}: it keeps changing")

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
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
            if self._read() == self._me:
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass


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
