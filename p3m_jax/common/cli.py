"""What the commands share: one flag style (underscores, defaults in every help, the old dashed spellings
accepted with a deprecation line), progress that prints plain lines when the output is not a terminal,
and the library log lines that normal operation should not show."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import re
import sys
import time
from typing import Iterable, Iterator, TypeVar

from p3m_jax.common.constants import DEFAULT_CACHE_DIR

T = TypeVar("T")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and appends ``(default: X)`` to every flag that has one."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help  # nothing to show: the flag is unset unless given
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` in the project's flag style: flags spelled with underscores, every
    default shown in ``--help``."""

    def __init__(self, prog: str, description: str | None):
        super().__init__(prog=prog, description=description, formatter_class=_HelpFormatter)


def add_ema_argument(parser: argparse.ArgumentParser) -> None:
    """``--ema``, shared by the commands that load weights."""
    parser.add_argument(
        "--ema",
        action="store_true",
        help="with a training workdir: its EMA of the weights (trained with config.ema_decay > 0)",
    )


def add_cache_dir_argument(parser: argparse.ArgumentParser) -> None:
    """``--cache_dir``, shared by the commands that compile the network."""
    parser.add_argument(
        "--cache_dir",
        default=None,
        help=f"JAX's persistent compilation cache folder ('' for none; without it: JAX_COMPILATION_CACHE_DIR "
        f"when set, else {DEFAULT_CACHE_DIR})",
    )


def image_size(text: str) -> tuple[int, int]:
    """A size flag: '128' -> (128, 128); '96x160' -> (96, 160) (height x width)."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        return int(parts[0]), int(parts[0])
    if len(parts) == 2:
        return int(parts[0]), int(parts[1])
    raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH, got {text!r}")


def progress(
    items: Iterable[T],
    *,
    desc: str,
    unit: str,
    total: int | None = None,
    every_seconds: float = 15.0,
    enabled: bool = True,
) -> Iterator[T]:
    """Yields ``items`` with progress on stderr: a tqdm bar on a terminal, else a plain line
    (``predict: 12/40 images, 1.9 images/s``) at most every ``every_seconds`` and at the end, so that
    a redirected log holds no cursor-control codes."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    if not enabled:
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm import tqdm  # pylint: disable=import-outside-toplevel

        yield from tqdm(items, desc=desc, unit=unit, total=total)
        return
    start = last = time.perf_counter()
    count = printed = 0
    of_total = f"/{total}" if total is not None else ""

    def line(now: float) -> str:
        return f"{desc}: {count}{of_total} {unit}s, {count / max(now - start, 1e-9):.1f} {unit}s/s"

    for item in items:
        yield item
        count += 1
        now = time.perf_counter()
        if now - last >= every_seconds or count == total:
            last, printed = now, count
            print(line(now), file=sys.stderr)
    if count and printed != count:  # no total known: the count reached at the end
        print(line(time.perf_counter()), file=sys.stderr)


# Library log lines that normal operation produces and that read like problems, by their start.
# TFDS announces the builder config of every read ("Using custom data configuration: ..."); orbax says that a
# checkpoint written by an earlier version has no metadata file, that a checkpoint opened for reading
# is read only (and so saves nothing), and that a save without metrics (the SIGTERM save) has none;
# TFDS, while a build is under way, that its version folder has no dataset_info.json yet.
_ROUTINE_LOG_STARTS = (
    "Using custom data configuration",
    "Metadata file does not exist",
    "Given directory is read only",
    "Requested tracked_metric",
    "Requested `tracked_metric`",
    "CheckpointManagerOptions.read_only=True",
    "Variant folder",
)


class _RoutineFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:  # never an error, whatever it says
            return True
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        return not message.lstrip().startswith(_ROUTINE_LOG_STARTS)


_FILTER = _RoutineFilter()


@contextlib.contextmanager
def routine_logs_quiet():
    """Within the block only: drops the routine library log lines above, on the absl logger (where TFDS
    and orbax write) and the root logger and on their handlers (records of child loggers reach those);
    every other line still shows. Each command runs its work inside one."""
    targets = [logging.getLogger("absl"), logging.getLogger()]
    targets += [handler for logger in list(targets) for handler in logger.handlers]
    added = [target for target in targets if _FILTER not in target.filters]
    for target in added:
        target.addFilter(_FILTER)
    try:
        yield
    finally:
        for target in added:
            target.removeFilter(_FILTER)


class _LineFilter(io.TextIOBase):
    """Writes through to ``stream`` every line that does not start (colour codes aside) with ``starts``."""

    def __init__(self, stream, starts: tuple[str, ...]):
        self._stream, self._starts, self._pending = stream, starts, ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if not re.sub(r"\x1b\[[0-9;]*m", "", line).startswith(self._starts):
                self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending and not self._pending.startswith(self._starts):
            self._stream.write(self._pending)
        self._pending = ""
        self._stream.flush()


@contextlib.contextmanager
def without_tfds_banner():
    """Around a TFDS build: drops the banner its ``download_and_prepare`` prints to stdout ("Downloading
    and preparing dataset Unknown size ...", about a download that these builds never make)."""
    previous = sys.stdout
    sys.stdout = _LineFilter(previous, ("Downloading and preparing dataset",))
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stdout = previous
