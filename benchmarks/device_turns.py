"""Device turns: how `device_suite.py` shares a GPU lent for minutes between benchmark processes.

XLA:GPU's compilation (with its autotuning) takes most of such a lease, so the suite starts several
benchmark processes at once, so that they compile side by side, and then gives the device to one at
a time for the timed part. It sets ``P3M_BENCH_TURN_DIR``; outside the suite these calls do nothing.
"""

from __future__ import annotations

import os
import pathlib
import time

TURN_DIR_ENV = "P3M_BENCH_TURN_DIR"


def wait_for_device_turn(poll_s: float = 0.2) -> None:
    """Says this process is ready (compiled) and blocks until the suite gives it the device.

    Writes ``ready.<pid>`` in the folder named by P3M_BENCH_TURN_DIR and waits for
    ``turn.<pid>``; returns at once when the variable is unset or this process already has its turn.
    """
    folder = os.environ.get(TURN_DIR_ENV)
    if not folder:
        return
    turn = pathlib.Path(folder) / f"turn.{os.getpid()}"
    if turn.exists():
        return
    (pathlib.Path(folder) / f"ready.{os.getpid()}").touch()
    start = time.monotonic()
    while not turn.exists():
        time.sleep(poll_s)
    print(
        f"# waited {time.monotonic() - start:.0f}s for the device (other benchmarks were compiling or timing)",
        flush=True,
    )


def end_device_turn() -> None:
    """Hands the device back to the suite (``done.<pid>``): the timed work on it is over."""
    folder = os.environ.get(TURN_DIR_ENV)
    if folder:
        (pathlib.Path(folder) / f"done.{os.getpid()}").touch()
