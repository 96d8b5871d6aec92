"""Tests of p3m-serve (python -m p3m_jax.serve): the real server in a subprocess on 127.0.0.1, with the small
stand-in model of tests/train_helpers.py (tests/tiny_serve.py), against `python -m p3m_jax.predict` run here
on the same weights: the same PNG files, a bounded load test, bad inputs, a real headless browser on the
page (which saves docs/images/serve.png), and the start-up errors."""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import os
import pathlib
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="p3m-serve needs the serve extra: pip install '.[serve]'")

from p3m_jax import predict  # noqa: E402
from p3m_jax.common import image_io  # noqa: E402
from p3m_jax.serve import app as serve_app  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_SERVE = [sys.executable, str(REPO / "tests" / "tiny_serve.py")]
SCREENSHOT = REPO / "docs" / "images" / "serve.png"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
QUEUE = 3  # places in the test server's queue: fewer than the load test's 32 concurrent requests
SECRET_NAME = "secret-holiday-portrait.png"  # the file name of uploads, which must not reach the log


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def encode_form(fields: dict) -> tuple[bytes, str]:
    """A multipart/form-data body: a str value is a text field, a (file name, bytes) pair a file."""
    boundary = "p3m-test-boundary-7d1f"
    parts = []
    for name, value in fields.items():
        if isinstance(value, tuple):
            head = f'Content-Disposition: form-data; name="{name}"; filename="{value[0]}"\r\n'
            head += "Content-Type: application/octet-stream\r\n"
            data = value[1]
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"\r\n', value.encode()
        parts.append(f"--{boundary}\r\n{head}\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Server:
    """tests/tiny_serve.py in a subprocess on a free port of 127.0.0.1, its output in files."""

    def __init__(self, checkpoint, folder: pathlib.Path, *flags: str):
        self.port = free_port()
        self.folder = folder
        self.tmpdir = folder / "tmp"  # the server's TMPDIR: a form spooled to a temporary file would land here
        self.tmpdir.mkdir()
        env = {**os.environ, "TMPDIR": str(self.tmpdir)}
        args = [*TINY_SERVE, "--checkpoint", str(checkpoint), "--port", str(self.port), *flags]
        with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err:
            self.process = subprocess.Popen(args, stdout=out, stderr=err, env=env, cwd=folder)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not start:\n{self.log()}")
            time.sleep(0.2)

    def request(self, method, path, body=None, headers=None, timeout=60):
        """(status, headers, body) of one request on a new connection."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def matte(self, image: bytes, **fields):
        """(status, headers, body) of POST /v1/matte with the photo and these text fields."""
        body, content_type = encode_form({"image": (SECRET_NAME, image), **fields})
        return self.request("POST", "/v1/matte", body, {"Content-Type": content_type})

    def health(self) -> dict:
        status, _, body = self.request("GET", "/healthz")
        assert status == 200
        return json.loads(body)

    def rss_kib(self) -> int:
        status = pathlib.Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))

    def log(self) -> str:
        return (self.folder / "stdout").read_text() + (self.folder / "stderr").read_text()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    """Random weights of the small stand-in model (`predict` here loads it like the server does)."""
    from p3m_jax.inference.predictor import Predictor

    return Predictor.random("resnet34", seed=0).save(tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    running = Server(
        checkpoint,
        tmp_path_factory.mktemp("server"),
        "--queue",
        str(QUEUE),
        "--max_megabytes",
        "2",
        "--max_megapixels",
        "1",
        "--compile_at_start",
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def sample(server, tmp_path_factory) -> pathlib.Path:
    """The page's first sample portrait, as a file."""
    status, headers, png = server.request("GET", "/samples/1.png")
    assert status == 200 and headers["content-type"] == "image/png"
    path = tmp_path_factory.mktemp("sample") / "portrait.png"
    path.write_bytes(png)
    return path


def predict_files(checkpoint, image: pathlib.Path, out: pathlib.Path, *flags: str) -> dict[str, bytes]:
    """The files `python -m p3m_jax.predict` writes for one image, by kind (alpha, rgba, composite)."""
    code = predict.main(["--checkpoint", str(checkpoint), "--input", str(image), "--output", str(out), *flags])
    assert code == 0
    return {p.stem.removeprefix(image.stem + "_"): p.read_bytes() for p in out.iterdir()}


@pytest.fixture(scope="module")
def reference(checkpoint, sample, tmp_path_factory) -> dict:
    """predict's files for the sample: HYBRID with estimated colours over green, RESIZE over white."""
    folder = tmp_path_factory.mktemp("predict")
    hybrid = predict_files(checkpoint, sample, folder / "hybrid", "--foreground", "estimate", "--background", "#00b140")
    resize = predict_files(checkpoint, sample, folder / "resize", "--strategy", "resize", "--background", "white")
    return {"hybrid": hybrid, "resize": resize}


def test_decoding_from_memory_matches_image_io(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    files = {
        "rgb.png": lambda p: Image.fromarray(rgb).save(p),
        "gray.png": lambda p: Image.fromarray(rgb[..., 0]).save(p),
        "rgba.png": lambda p: Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(p),
        "sixteen.png": lambda p: Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(p),
        "palette.png": lambda p: Image.fromarray(rgb).convert("P").save(p),
        "rotated.jpg": lambda p: Image.fromarray(rgb).save(p, exif=exif, quality=90),
        "photo.webp": lambda p: Image.fromarray(rgb).save(p, quality=80),
    }
    for name, write in files.items():
        write(tmp_path / name)
        opened = serve_app.open_image((tmp_path / name).read_bytes(), "image", 10**6)
        np.testing.assert_array_equal(serve_app.decode_rgb(opened), image_io.load_rgb(tmp_path / name), err_msg=name)


def test_api_png_equals_predict(server, checkpoint, sample, reference, tmp_path):
    image = sample.read_bytes()
    hybrid, resize = reference["hybrid"], reference["resize"]
    cases = [
        ({"strategy": "hybrid"}, hybrid["alpha"]),
        ({}, hybrid["alpha"]),  # the server's default strategy (hybrid) and output (alpha)
        ({"strategy": "resize", "output": "alpha"}, resize["alpha"]),
        ({"output": "rgba", "foreground": "estimate"}, hybrid["rgba"]),
        ({"output": "composite", "foreground": "estimate", "background": "#00b140"}, hybrid["composite"]),
        ({"strategy": "resize", "output": "rgba"}, resize["rgba"]),
        ({"strategy": "resize", "output": "composite", "background": "white"}, resize["composite"]),
    ]
    for fields, expected in cases:
        status, headers, body = server.matte(image, **fields)
        assert status == 200, (fields, body[:200])
        assert headers["content-type"] == "image/png" and headers["cache-control"] == "no-store"
        assert body == expected, fields
    # A JPEG that its EXIF orientation turns upright, and a background image (scaled to cover, as predict's).
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.open(sample).save(tmp_path / "turned.jpg", exif=exif, quality=92)
    Image.open(sample).rotate(180).save(tmp_path / "wall.png")
    files = predict_files(
        checkpoint, tmp_path / "turned.jpg", tmp_path / "out", "--background", str(tmp_path / "wall.png")
    )
    body, content_type = encode_form(
        {
            "image": ("turned.jpg", (tmp_path / "turned.jpg").read_bytes()),
            "output": "composite",
            "background_image": ("wall.png", (tmp_path / "wall.png").read_bytes()),
        }
    )
    status, _, png = server.request("POST", "/v1/matte", body, {"Content-Type": content_type})
    assert status == 200 and png == files["composite"]
    assert server.matte((tmp_path / "turned.jpg").read_bytes())[2] == files["alpha"]


def test_healthz_and_page(server):
    health = server.health()
    assert health["model"].startswith("resnet34 (float32) from model checkpoint")
    assert health["source"].startswith("model checkpoint") and health["compiled"] is True
    assert health["queue"]["places"] == QUEUE and health["strategy"] == "hybrid"
    status, headers, page = server.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in headers["content-security-policy"]
    assert b"://" not in page  # nothing is loaded from another site: the page works offline
    assert server.request("GET", "/docs")[0] == 404  # FastAPI's docs pages would load scripts from a CDN


def png_header(width: int, height: int) -> bytes:
    """A valid PNG of a few hundred bytes that claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(4096))) + chunk(b"IEND", b"")
    )


def test_bad_inputs_get_a_4xx_and_a_json_error(server, sample):
    image = sample.read_bytes()
    jpeg = io.BytesIO()
    Image.open(sample).save(jpeg, format="JPEG", quality=90)
    large = io.BytesIO()
    Image.fromarray(np.zeros((1000, 1200, 3), np.uint8)).save(large, format="PNG")  # 1.2 megapixels, over 1
    cases = [
        ("a text file", {"image": (SECRET_NAME, b"Dear diary, this is not a photo.\n" * 20)}, 415, "not an image"),
        ("an empty file", {"image": (SECRET_NAME, b"")}, 400, "empty"),
        ("a truncated JPEG", {"image": (SECRET_NAME, jpeg.getvalue()[: len(jpeg.getvalue()) // 2])}, 400, "truncated"),
        ("a 20000x20000 PNG header", {"image": (SECRET_NAME, png_header(20000, 20000))}, 413, "20000x20000"),
        ("too many pixels", {"image": (SECRET_NAME, large.getvalue())}, 413, "--max_megapixels"),
        ("too many bytes", {"image": (SECRET_NAME, os.urandom(2_100_000))}, 413, "--max_megabytes"),
        ("an unknown strategy", {"image": (SECRET_NAME, image), "strategy": "fast"}, 400, "strategy must be"),
        ("an unknown output", {"image": (SECRET_NAME, image), "output": "jpeg"}, 400, "output must be"),
        ("an unknown foreground", {"image": (SECRET_NAME, image), "foreground": "yes"}, 400, "foreground must"),
        ("a wrong colour", {"image": (SECRET_NAME, image), "background": "sky"}, 400, "background must be a colour"),
        ("composite, no background", {"image": (SECRET_NAME, image), "output": "composite"}, 400, "needs a background"),
        ("an unknown field", {"image": (SECRET_NAME, image), "strategie": "resize"}, 400, "unknown field"),
        ("no photo", {"strategy": "resize"}, 400, "field 'image'"),
    ]
    for what, fields, status, message in cases:
        body, content_type = encode_form(fields)
        answer, headers, payload = server.request("POST", "/v1/matte", body, {"Content-Type": content_type})
        assert (answer, headers["content-type"]) == (status, "application/json"), (what, payload[:300])
        assert message in json.loads(payload)["error"], (what, payload)
    answer, _, payload = server.request("POST", "/v1/matte", b'{"image": 1}', {"Content-Type": "application/json"})
    assert answer == 400 and "multipart/form-data" in json.loads(payload)["error"]
    answer, _, payload = server.request("GET", "/v1/matte")
    assert answer == 405 and "error" in json.loads(payload)
    assert server.matte(image)[0] == 200  # and it still answers


def test_concurrent_requests_are_answered_or_refused_with_retry_after(server, sample):
    image = sample.read_bytes()
    barrier = threading.Barrier(32)

    def one(_):
        barrier.wait()
        start = time.perf_counter()
        status, headers, body = server.matte(image, output="rgba", foreground="estimate")
        return status, headers, body, time.perf_counter() - start

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32)))
    elapsed = time.perf_counter() - start
    statuses = [status for status, *_ in answers]
    assert len(answers) == 32 and set(statuses) <= {200, 503}, statuses
    # The first QUEUE + 1 are always taken; 32 at once overflow the queue (each takes a tenth of a second or more).
    assert statuses.count(200) >= QUEUE + 1 and statuses.count(503) >= 1, statuses
    for status, headers, body, _ in answers:
        if status == 503:
            assert int(headers["retry-after"]) >= 1 and "busy" in json.loads(body)["error"]
        else:
            assert Image.open(io.BytesIO(body)).mode == "RGBA"
    slowest = max(seconds for status, *_, seconds in answers if status == 200)
    print(
        f"\n32 concurrent: {statuses.count(200)} x 200, {statuses.count(503)} x 503 in {elapsed:.2f} s "
        f"(slowest 200: {slowest:.2f} s)"
    )


def test_memory_stays_flat_over_100_requests(server, sample):
    image = sample.read_bytes()
    for _ in range(10):  # allocator pools and caches settle first
        assert server.matte(image)[0] == 200
    before = server.rss_kib()
    start = time.perf_counter()
    for index in range(100):
        status, _, body = server.matte(image, strategy=("hybrid", "resize")[index % 2])
        assert status == 200, body[:200]
    seconds = time.perf_counter() - start
    after = server.rss_kib()
    print(
        f"\n100 sequential: {seconds:.1f} s ({seconds * 10:.0f} ms each); RSS {before / 1024:.0f} MiB -> "
        f"{after / 1024:.0f} MiB ({100 * (after - before) / before:+.1f} %)"
    )
    assert after < 1.10 * before


def test_a_slow_client_does_not_block_the_others(server, sample):
    body, content_type = encode_form({"image": (SECRET_NAME, sample.read_bytes())})
    slow = {}

    def upload_slowly():
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
            head = (
                f"POST /v1/matte HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            sock.sendall(head.encode())
            for piece in np.array_split(np.frombuffer(body, np.uint8), 12):
                sock.sendall(piece.tobytes())
                time.sleep(0.25)  # the body takes 3 s
            slow["sent"] = time.perf_counter()
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            slow["status"] = int(answer.split(b" ", 2)[1])

    thread = threading.Thread(target=upload_slowly)
    thread.start()
    time.sleep(0.3)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        assert server.matte(sample.read_bytes())[0] == 200
        times.append(time.perf_counter() - start)
    others_done = time.perf_counter()
    thread.join(30)
    assert slow["status"] == 200
    assert others_done < slow["sent"] and max(times) < 2.0, (times, others_done, slow)


@pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="the browser test needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver; "
    ".ci/run installs them)",
)
def test_the_page_in_a_real_browser(server, sample, reference, tmp_path, monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the test extra)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager, if asked at all: fetch nothing
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        size = {"width": 1280, "height": 760, "deviceScaleFactor": 1, "mobile": False}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", size)  # the screenshot's size
        wait = WebDriverWait(driver, 60)
        driver.get(server.url + "/")
        wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("resnet34"))

        def finished(state: str):
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in (state, "error"))
            assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == state, driver.find_element(
                By.ID, "error"
            ).text

        start = time.perf_counter()
        driver.find_element(By.ID, "file").send_keys(str(sample))  # portrait.png
        finished("done")
        print(f"\nbrowser: upload to the three results {time.perf_counter() - start:.2f} s")
        for kind in ("alpha", "rgba", "composite"):
            assert driver.find_element(By.ID, f"result-{kind}").get_attribute("naturalWidth") == "256"
        driver.find_element(By.ID, "download-alpha").click()
        downloaded = downloads / "portrait_alpha.png"
        WebDriverWait(driver, 30).until(lambda d: downloaded.exists() and downloaded.stat().st_size > 0)
        time.sleep(0.2)
        assert downloaded.read_bytes() == reference["hybrid"]["alpha"]

        driver.find_element(By.ID, "sample-2").click()  # a sample portrait, one click away
        wait.until(lambda d: d.find_element(By.ID, "download-alpha").get_attribute("download") == "sample-2_alpha.png")
        finished("done")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(SCREENSHOT))

        notes = tmp_path / "notes.txt"
        notes.write_text("Shopping list: bread, milk.\n")
        driver.find_element(By.ID, "file").send_keys(str(notes))
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
        error = driver.find_element(By.ID, "error")
        assert error.is_displayed() and "not an image" in error.text
    finally:
        driver.quit()
    assert Image.open(SCREENSHOT).size == (1280, 760)


def test_the_log_holds_no_photo_and_nothing_was_written(server, sample):
    """The log lines give path, status, sizes and time only, and no form (of this test's requests or of those
    above, a 2 MB one among them) was spooled to a temporary file."""
    assert server.matte(sample.read_bytes())[0] == 200
    assert server.matte(b"Dear diary, this is not a photo.")[0] == 415
    time.sleep(0.2)  # the log line is printed after the answer is sent
    log = server.log()
    assert SECRET_NAME not in log and "diary" not in log
    requests = [line for line in log.splitlines() if line.startswith(("GET ", "POST "))]
    assert len(requests) >= 3
    for line in requests:
        assert re.fullmatch(r"(GET|POST) /[\w/.]* \d{3} [\d.]+ KiB in, [\d.]+ KiB out, [\d.]+ s", line), line
    assert not list(server.tmpdir.iterdir())


@pytest.mark.parametrize("problem", ["missing checkpoint", "busy port"])
def test_a_start_up_problem_is_one_error_line_and_exit_status_2(tmp_path, problem):
    port = free_port()
    args = [sys.executable, "-m", "p3m_jax.serve", "--checkpoint", str(tmp_path / "no-such-model"), "--port", str(port)]
    blocker = socket.socket()
    if problem == "busy port":
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
    with blocker:
        done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert ("no checkpoint at" if problem == "missing checkpoint" else f"cannot listen on 127.0.0.1:{port}") in lines[0]
    assert not done.stdout
