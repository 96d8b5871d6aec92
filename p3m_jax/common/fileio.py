"""Small file helpers shared by the command-line tools."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import tempfile
from typing import IO, Iterator

from p3m_jax.common import storage


def _current_umask() -> int:
    # The only way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def usual_mode(*, directory: bool = False) -> int:
    """The permissions a plain ``open(path, "w")`` (0666) or ``os.mkdir`` (0777) gives, less the umask:
    what a file or folder made by `tempfile` (owner-only) gets before it is renamed into place."""
    return (0o777 if directory else 0o666) & ~_current_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Opens a temporary file next to ``path`` and renames it onto ``path`` on success.

    A reader never sees a half-written file, and a failure (exception, interrupt) leaves
    neither the target nor the temporary file behind. The file gets the permissions a plain
    ``open(path, "w")`` would give it (0666 less the umask), not `mkstemp`'s owner-only 0600.
    A ``gs://`` object is written from memory in one upload once the block succeeds.
    """
    path = os.fspath(path)
    if storage.is_remote(path):
        buffer = io.BytesIO() if "b" in mode else io.StringIO()
        yield buffer
        data = buffer.getvalue()
        storage.write_object(path, data if isinstance(data, bytes) else data.encode("utf-8"))
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.chmod(tmp, usual_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def prepare_output(output_dir) -> bool:
    """Creates ``output_dir`` if needed and proves it writable (OSError naming it otherwise).
    Returns whether it was created here (so that it can be removed if nothing is written).
    A ``gs://`` folder needs no creating: its bucket is checked to exist and accept writes."""
    if storage.is_remote(output_dir):
        storage.check_bucket(output_dir, write=True)
        return False
    output_dir = pathlib.Path(output_dir)
    created = not output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".write_test_", dir=output_dir):
            pass
    except OSError as e:
        if created and output_dir.is_dir():
            output_dir.rmdir()
        raise OSError(f"output folder {output_dir} is not writable: {e.strerror or e}") from e
    return created


def remove_if_empty(output_dir, created: bool) -> None:
    """Removes ``output_dir`` if this run created it and nothing was written into it."""
    if storage.is_remote(output_dir):
        return  # a bucket "folder" exists only through its objects
    output_dir = pathlib.Path(output_dir)
    if created and output_dir.is_dir() and not any(output_dir.iterdir()):
        output_dir.rmdir()
