"""One path type for every file the project reads or writes: a local path or a ``gs://`` object.

Paths are `etils.epath.Path`s (what orbax and TFDS use): a local path has ``~`` expanded and is made
absolute; a ``gs://bucket/...`` path reaches Google Cloud Storage through gcsfs, without TensorFlow.
Object storage has no rename and no append, so the helpers here write an object whole in one upload
(`write_object`), mirror a local staging folder to a bucket (`StagedFolder`, for files that other
libraries append to), and turn the client's errors into one-line `StorageError`s that say what to do.

An emulator such as fake-gcs-server is used by setting ``STORAGE_EMULATOR_HOST`` (gcsfs),
``TENSORSTORE_GCS_HTTP_URL`` and ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (tensorstore, orbax's arrays) and
``CLOUD_STORAGE_EMULATOR_ENDPOINT`` (ArrayRecord's reader); docs/training.md shows how.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shutil
import socket
import tempfile
import time
import urllib.parse
from typing import Iterable, Iterator

from etils import epath

GCS_SCHEME = "gs://"
GCS_ENDPOINT = "https://storage.googleapis.com"
AUTH_HINT = (
    "authenticate with `gcloud auth application-default login`, or run on a VM whose service account may use the bucket"
)


class StorageError(OSError):
    """A bucket or object that cannot be used; the message names it and says what to do."""


def is_remote(path) -> bool:
    """Whether ``path`` names an object in a bucket (``gs://...``) rather than a local file."""
    return os.fspath(path).startswith(GCS_SCHEME)


def resolve(path) -> epath.Path:
    """``path`` as an `epath.Path`: ``gs://`` kept as it is; a local path with ``~`` expanded, made absolute.

    Other URL schemes are refused (ValueError naming the path): only local files and Cloud Storage are
    tested."""
    text = os.fspath(path)
    if is_remote(text):
        if not text[len(GCS_SCHEME) :].split("/", 1)[0]:
            raise ValueError(f"{text}: a gs:// path needs a bucket name, e.g. gs://my-bucket/runs/r34")
        gcs_filesystem()  # the client epath will use, made quietly (cached after the first call)
        return epath.Path(text.rstrip("/") if text.count("/") > 2 else text)
    if "://" in text:
        raise ValueError(f"{text}: only local paths and gs:// buckets are supported")
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def as_path(path) -> pathlib.Path:
    """``path`` as given, for a command's own paths: a `pathlib.Path` (``~`` expanded, a relative path kept
    relative, so that messages show it as the user typed it) or an `epath.Path` for ``gs://``."""
    text = os.fspath(path)
    return resolve(text) if is_remote(text) else pathlib.Path(os.path.expanduser(text))


def bucket_of(path) -> str:
    """The bucket name of a ``gs://`` path."""
    return os.fspath(path)[len(GCS_SCHEME) :].split("/", 1)[0]


def gcs_filesystem():
    """The process's gcsfs filesystem (fsspec caches one instance, which epath shares).

    Made here with google-auth's warning about a missing metadata server held back: gcsfs tries each
    way to find credentials in turn, and a machine that is not a Cloud VM has none. What is missing is
    said by `check_bucket` when it matters (a write without any credentials)."""
    try:
        import fsspec  # pylint: disable=import-outside-toplevel
    except ImportError as e:  # gcsfs is a dependency; a broken install gets a clear line
        raise StorageError(f"gs:// paths need gcsfs (pip install gcsfs): {e}") from e
    probe_logger = logging.getLogger("google.auth._default")
    level = probe_logger.level
    probe_logger.setLevel(logging.ERROR)
    try:
        return fsspec.filesystem("gs", finalize_on_close=True)  # the arguments epath passes: one shared instance
    finally:
        probe_logger.setLevel(level)


def endpoint() -> str:
    """The Cloud Storage endpoint gcsfs talks to: an emulator's (``STORAGE_EMULATOR_HOST``) or Google's."""
    location = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if location in ("", "default"):
        return GCS_ENDPOINT
    return location if "://" in location else f"http://{location}"


def _check_endpoint_reachable(timeout_s: float = 10.0) -> None:
    """Fails in seconds when nothing listens at the endpoint (gcsfs would retry for half a minute)."""
    url = urllib.parse.urlparse(endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        via = " (STORAGE_EMULATOR_HOST)" if endpoint() != GCS_ENDPOINT else ""
        raise StorageError(f"cannot reach Cloud Storage at {endpoint()}{via}: {e.strerror or e}") from None


def describe_error(path, error: BaseException) -> str:
    """One line for an error of the storage client on ``path``."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    code = getattr(error, "code", None)
    if isinstance(error, PermissionError) or code in (401, 403) or text.startswith("Forbidden"):
        return f"{path}: permission denied ({text}); {AUTH_HINT}"
    if isinstance(error, FileNotFoundError):
        return f"{path}: not found"
    return f"{path}: {type(error).__name__}: {text}"


def check_bucket(path, *, write: bool = False) -> None:
    """For a ``gs://`` path: that the endpoint answers, the bucket exists and (``write``) that an object
    can be written under ``path`` (a folder; a probe object is written there and removed). StorageError
    naming the bucket otherwise. Nothing happens for a local path."""
    if not is_remote(path):
        return
    bucket = bucket_of(path)
    fs = gcs_filesystem()
    # gcsfs falls back to anonymous access when it finds no credentials: enough to read a public bucket.
    if write and endpoint() == GCS_ENDPOINT and getattr(getattr(fs, "credentials", None), "method", "") == "anon":
        raise StorageError(f"no Google Cloud credentials found to write to {path}: {AUTH_HINT}")
    _check_endpoint_reachable()
    try:
        fs.call("GET", "b/{}", bucket, json_out=True)
    except FileNotFoundError:
        raise StorageError(f"bucket gs://{bucket} does not exist (create it, or check the name in {path})") from None
    except Exception as e:  # noqa: BLE001  (the client's HTTP and auth errors)
        raise StorageError(describe_error(f"gs://{bucket}", e)) from None
    if write:
        probe = resolve(path) / f".p3m_write_test_{socket.gethostname()}_{os.getpid()}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"cannot write to gs://{bucket}: {describe_error(path, e)}") from None


@contextlib.contextmanager
def reported(path, what: str) -> Iterator[None]:
    """Turns an error of the storage client while doing ``what`` with ``path`` into a StorageError."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001
        if not is_remote(path) and isinstance(e, OSError):
            raise
        raise StorageError(f"{what}: {describe_error(path, e)}") from None


def write_object(path, data: bytes) -> None:
    """Writes the ``gs://`` object ``path`` in one upload: a reader sees all of ``data`` or nothing (the
    object appears when the upload completes). Local files are written by `fileio.atomic_write`."""
    if not is_remote(path):
        raise ValueError(f"{path}: not a gs:// object (use fileio.atomic_write for a local file)")
    path = resolve(path)
    with reported(path, "writing"):
        path.write_bytes(data)


def _relative_files(local_dir: str) -> list[str]:
    """The files under ``local_dir``, as paths relative to it."""
    return [
        os.path.relpath(os.path.join(folder, name), local_dir)
        for folder, _, names in os.walk(local_dir)
        for name in names
    ]


def size_of(path) -> int:
    """The size of a file or object in bytes."""
    if is_remote(path):
        return int(gcs_filesystem().size(os.fspath(path)))
    return os.path.getsize(os.path.expanduser(os.fspath(path)))


def upload_tree(local_dir, remote_dir, *, last: Iterable[str] = ()) -> int:
    """Copies the files under ``local_dir`` to ``remote_dir`` (kept relative paths); files whose name is
    in ``last`` go after all others, in that order (a reader that waits for them sees a complete tree).
    Returns the number of files."""
    local_dir, remote_dir = os.fspath(local_dir), resolve(remote_dir)
    last = list(last)
    files = _relative_files(local_dir)
    files.sort(key=lambda rel: (last.index(os.path.basename(rel)) + 1 if os.path.basename(rel) in last else 0, rel))
    for rel in files:
        with open(os.path.join(local_dir, rel), "rb") as f:
            write_object(remote_dir / rel.replace(os.sep, "/"), f.read())
    return len(files)


@contextlib.contextmanager
def local_copy(path, log=print) -> Iterator[str]:
    """A local path for ``path``: itself when local (``~`` expanded); for a ``gs://`` folder or file, a
    copy downloaded into a temporary folder, removed afterwards (for readers of local files only: the
    folder layouts, the release zip, Pillow's decoders)."""
    if not is_remote(path):
        yield os.path.expanduser(os.fspath(path))
        return
    check_bucket(path)
    source = resolve(path)
    with reported(source, "reading"):
        if not source.exists():
            raise FileNotFoundError(f"{path} does not exist")
    local = tempfile.mkdtemp(prefix="p3m_copy_")
    try:
        target = os.path.join(local, source.name)
        with reported(source, "downloading"):
            gcs_filesystem().get(os.fspath(source), target, recursive=True)
        log(f"copied {path} to a local temporary folder")
        yield target
    finally:
        shutil.rmtree(local, ignore_errors=True)


# TFDS reads a version folder as built once both are there (`is_valid_variant_dir`): uploaded last.
TFDS_FINAL_FILES = ("features.json", "dataset_info.json")


def upload_tfds_build(local_data_dir, version_dir, remote_data_dir) -> int:
    """Uploads a TFDS version folder built under ``local_data_dir`` to the same place under the bucket
    folder ``remote_data_dir``, its two metadata files last, so that readers never see a partial build."""
    relative = os.path.relpath(os.fspath(version_dir), os.fspath(local_data_dir)).replace(os.sep, "/")
    return upload_tree(version_dir, resolve(remote_data_dir) / relative, last=TFDS_FINAL_FILES)


class StagedFolder:
    """A local folder that stands for a folder in a bucket: libraries that append to files (TensorBoard's
    event writer, the profiler) write here, and `sync` uploads every file that changed since the last
    sync, each as a whole object. For a local destination the folder is the destination itself and
    `sync` does nothing.

    Args:
      destination: the local or ``gs://`` folder.
      min_interval_s: `sync(force=False)` uploads at most this often.
    """

    def __init__(self, destination, *, min_interval_s: float = 30.0):
        self.destination = resolve(destination)
        self.remote = is_remote(self.destination)
        self.min_interval_s = min_interval_s
        self.local = tempfile.mkdtemp(prefix="p3m_staged_") if self.remote else os.fspath(self.destination)
        self._uploaded: dict[str, tuple[float, int]] = {}
        self._last_sync = time.monotonic()

    def sync(self, *, force: bool = True) -> None:
        """Uploads the changed files (``force=False``: only when ``min_interval_s`` has passed)."""
        if not self.remote or (not force and time.monotonic() - self._last_sync < self.min_interval_s):
            return
        self._last_sync = time.monotonic()
        for rel in _relative_files(self.local):
            path = os.path.join(self.local, rel)
            stat = os.stat(path)
            stamp = (stat.st_mtime, stat.st_size)
            if self._uploaded.get(rel) != stamp:
                with open(path, "rb") as f:
                    write_object(self.destination / rel.replace(os.sep, "/"), f.read())
                self._uploaded[rel] = stamp

    def close(self) -> None:
        """Uploads what changed and removes the local staging folder."""
        if self.remote:
            try:
                self.sync()
            finally:
                shutil.rmtree(self.local, ignore_errors=True)


__all__ = [
    "StagedFolder",
    "StorageError",
    "as_path",
    "bucket_of",
    "check_bucket",
    "describe_error",
    "endpoint",
    "is_remote",
    "local_copy",
    "reported",
    "resolve",
    "size_of",
    "upload_tfds_build",
    "upload_tree",
    "write_object",
]
