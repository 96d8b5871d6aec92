"""The app of `p3m_jax.serve`: the page, the matte API and the queue in front of the model.

A request's photo is read into memory (the multipart form is parsed here rather than by Starlette, whose
parser spools files over 1 MiB to a temporary file), checked from its header (format, pixels) before
it is decoded, and handed to the one worker thread that runs the model; the answer is the PNG that
`python -m p3m_jax.predict` writes, made by the same functions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import importlib.resources
import io
import math
import sys
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, ImageOps
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException

from p3m_jax import predict
from p3m_jax.common import image_io
from p3m_jax.inference import compositing, strategies
from p3m_jax.inference.predictor import clear_compiled_programs
from tfds_p3m10k.synthetic import render_portrait

OUTPUTS = ("alpha", "rgba", "composite")
FIELDS = ("image", "strategy", "output", "foreground", "background", "background_image")
FORMATS = ("JPEG", "PNG", "WEBP")  # Pillow's names (JPEG includes the MPO files of cameras that store two pictures)
SAMPLE_SEEDS = (2, 3, 4)  # the synthetic portraits (tfds_p3m10k.synthetic, as the quickstart's) the page offers
SAMPLE_SIZE = (320, 256)  # height, width
_FIELD_BYTES = 1024  # a text field (strategy, colour...) longer than this is not one of ours
_FORM_OVERHEAD = 64 * 1024  # multipart boundaries and headers on top of the photo's bytes
# Every distinct photo size compiles its own programs: past this many input shapes they are dropped
# (and read back from JAX's persistent cache when needed), so the server's memory stays bounded.
_MAX_PROGRAM_SHAPES = 24
_PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob: data:; "
    "connect-src 'self' blob:; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may be: the upload's bytes, a photo's pixels, and how long its upload may take;
    ``queue``: how many requests may wait while the model runs one."""

    max_bytes: int
    max_pixels: int
    queue: int
    read_timeout: float = 60.0


class RequestError(Exception):
    """A request answered with ``status`` and JSON ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclasses.dataclass
class MatteJob:
    """One checked request: the photo opened from memory (not decoded yet) and the options."""

    image: Image.Image
    strategy: str
    output: str
    foreground: str
    background: tuple | Image.Image | None


def _megabytes(size: float) -> str:
    return f"{size / 1e6:.1f} MB"


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request's body, at most ``max_bytes`` (and the form's overhead) read within ``read_timeout``."""
    limit = limits.max_bytes + _FORM_OVERHEAD
    too_large = RequestError(413, f"the upload is larger than {_megabytes(limits.max_bytes)} (--max_megabytes)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0

    async def collect():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), limits.read_timeout)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the upload took longer than {limits.read_timeout:g} s") from None
    return b"".join(chunks)


def parse_form(body: bytes, content_type: str) -> dict[str, bytes]:
    """The fields of a multipart/form-data body, by name, parsed in memory (files included)."""
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        raise RequestError(400, "send a multipart/form-data form with the photo in the field 'image'")
    fields: dict[str, bytes] = {}
    part = {"header": b"", "value": b"", "headers": {}, "data": bytearray()}

    def on_part_begin():
        part.update(header=b"", value=b"", headers={}, data=bytearray())

    def on_header_field(data, start, end):
        part["header"] += data[start:end]

    def on_header_value(data, start, end):
        part["value"] += data[start:end]

    def on_header_end():
        part["headers"][part["header"].lower()] = part["value"]
        part.update(header=b"", value=b"")

    def on_part_data(data, start, end):
        part["data"] += data[start:end]

    def on_part_end():
        _, options = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name in fields:
            raise RequestError(400, f"the field {name!r} is given twice")
        fields[name] = bytes(part["data"])

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    try:
        parser = MultipartParser(params[b"boundary"], callbacks)
        parser.write(body)
        parser.finalize()
    except MultipartParseError as error:
        raise RequestError(400, f"malformed multipart form: {error}") from None
    return fields


def open_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """The image in ``data`` opened from its header only: its format and size are checked before any
    pixel is decoded (a 20000x20000 PNG of a few bytes is refused here, not decoded into 1.2 GB)."""
    if not data:
        raise RequestError(400, f"the field {field!r} is an empty file")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as error:
        raise RequestError(413, f"{field}: {error}") from None
    except (OSError, SyntaxError, ValueError, EOFError):  # UnidentifiedImageError is an OSError
        raise RequestError(415, f"the field {field!r} is not an image: send a JPEG, PNG or WebP file") from None
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(
            413,
            f"the {field} is {width}x{height} ({width * height / 1e6:.1f} megapixels); the limit is "
            f"{max_pixels / 1e6:g} megapixels (--max_megapixels)",
        )
    return image


def decode_rgb(image: Image.Image) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an opened image, upright, as `image_io.load_rgb` gives for its file."""
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # a truncated or corrupt file fails here, when its pixels are decoded
        raise RequestError(400, f"cannot read the image: {error}") from None
    return image_io.rgb_of(image)


def _choice(fields: dict, name: str, choices, default):
    text = fields.get(name, b"").decode("utf-8", "replace").strip().lower()
    if not text:
        return default
    if text not in choices:
        raise RequestError(400, f"{name} must be one of {', '.join(choices)}, got {text[:40]!r}")
    return text


def parse_job(fields: dict[str, bytes], default_strategy: str, max_pixels: int) -> MatteJob:
    """The checked request of a form's fields (RequestError for an unknown field or value)."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0][:40]!r}; the fields are {', '.join(FIELDS)}")
    too_long = [name for name in FIELDS if "image" not in name and len(fields.get(name, b"")) > _FIELD_BYTES]
    if too_long:
        raise RequestError(400, f"the field {too_long[0]!r} is too long")
    if "image" not in fields:
        raise RequestError(400, "no photo: send it in the field 'image'")
    strategy = _choice(fields, "strategy", strategies.STRATEGIES, default_strategy)
    output = _choice(fields, "output", OUTPUTS, "alpha")
    foreground = _choice(fields, "foreground", compositing.FOREGROUNDS, "original")
    background = None
    colour = fields.get("background", b"").decode("utf-8", "replace").strip()
    if colour and "background_image" in fields:
        raise RequestError(400, "give either a background colour or a background_image, not both")
    if colour:
        background = compositing.parse_colour(colour)
        if background is None:
            raise RequestError(400, f"background must be a colour (white, #00b140, 0,177,64), got {colour[:40]!r}")
    elif "background_image" in fields:
        background = open_image(fields["background_image"], "background_image", max_pixels)
    if output == "composite" and background is None:
        raise RequestError(400, "output=composite needs a background colour or a background_image")
    image = open_image(fields["image"], "image", max_pixels)
    return MatteJob(image, strategy, output, foreground, background)


class MatteService:
    """The model behind the API: one worker thread runs one job at a time; at most ``queue`` more wait.

    The counts are kept on the event loop's thread, so they need no lock."""

    def __init__(self, predictor, strategy: str = "hybrid", bucket: int = 0, queue: int = 8):
        self.predictor = predictor
        self.strategy = strategy
        self.queue = queue
        self.runner = strategies.NetworkRunner(predictor, bucket or None)
        self.compiled = False  # whether a matte has been made (so the network has compiled for one size)
        self.accepted = 0  # requests running or waiting
        self._seconds = 1.0  # running mean of a job's time, for Retry-After
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="p3m-serve")

    def health(self) -> dict:
        return {
            "status": "ok",
            "model": self.predictor.describe(),
            "arch": getattr(self.predictor, "arch", None),
            "source": getattr(self.predictor, "source", None),
            "compiled": self.compiled,
            "strategy": self.strategy,
            "strategies": list(strategies.STRATEGIES),
            "queue": {"running": min(self.accepted, 1), "waiting": max(self.accepted - 1, 0), "places": self.queue},
        }

    def run_job(self, job: MatteJob) -> bytes:
        """The PNG of one job (runs on the worker thread); RequestError 422 for a photo the strategy
        cannot process (what `predict` reports and skips)."""
        start = time.perf_counter()
        try:
            return self._png(job)
        except (ValueError, OSError) as error:
            raise RequestError(422, f"cannot process the image: {error}") from None
        finally:
            self._seconds = 0.7 * self._seconds + 0.3 * (time.perf_counter() - start)
            if len(self.runner.input_shapes) > _MAX_PROGRAM_SHAPES:
                clear_compiled_programs()
                self.runner.input_shapes.clear()

    def _png(self, job: MatteJob) -> bytes:
        """The PNG that `predict.run` writes for this job's output, made by the same functions."""
        image = decode_rgb(job.image)
        alpha = predict.predict_image(self.runner, image, job.strategy)
        self.compiled = True
        if job.output == "alpha":
            return image_io.png_bytes(alpha)
        fg = compositing.estimate_foreground(image, alpha) if job.foreground == "estimate" else image
        if job.output == "rgba":
            return image_io.png_bytes(np.dstack([fg, alpha]))
        background = decode_rgb(job.background) if isinstance(job.background, Image.Image) else job.background
        return image_io.png_bytes(compositing.composite(fg, alpha, background))

    async def submit(self, job: MatteJob) -> bytes:
        """Runs ``job`` on the worker when a place is free; RequestError 503 with Retry-After when not."""
        if self.accepted > self.queue:
            retry = max(1, min(300, math.ceil(self._seconds * self.accepted)))
            raise RequestError(
                503,
                f"the server is busy ({self.accepted} requests ahead); try again in {retry} s",
                {"Retry-After": str(retry)},
            )
        self.accepted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self.run_job, job)
        finally:
            self.accepted -= 1

    def compile_samples(self) -> concurrent.futures.Future:
        """Starts a matte of the first sample portrait on the worker (the network compiles for its size)."""
        image = Image.open(io.BytesIO(sample_png(0)))
        return self._executor.submit(self.run_job, MatteJob(image, self.strategy, "alpha", "original", None))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@functools.lru_cache(maxsize=len(SAMPLE_SEEDS))
def sample_png(index: int) -> bytes:
    """The PNG of the page's sample portrait ``index`` (rendered once, deterministic)."""
    return image_io.png_bytes(render_portrait(SAMPLE_SEEDS[index], *SAMPLE_SIZE).image)


class RequestLog:
    """ASGI middleware: one line per request with its method, path, status, sizes and time; nothing of
    the photo, its file name or the client."""

    def __init__(self, app, stream=None):
        self.app = app
        self.stream = stream

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, sizes, status = time.perf_counter(), [0, 0], [0]

        async def counting_receive():
            message = await receive()
            sizes[0] += len(message.get("body", b""))
            return message

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            sizes[1] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        except Exception:
            status[0] = status[0] or 500  # answered by Starlette's error middleware, outside this one
            raise
        finally:
            print(
                f"{scope['method']} {scope['path']} {status[0] or 'aborted'} "
                f"{sizes[0] / 1024:.1f} KiB in, {sizes[1] / 1024:.1f} KiB out, {time.perf_counter() - start:.3f} s",
                file=self.stream or sys.stderr,
                flush=True,
            )


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(service: MatteService, limits: Limits) -> FastAPI:
    """The FastAPI app: ``/``, ``/v1/matte``, ``/healthz`` and the sample portraits."""
    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, and the page here loads nothing.
    app = FastAPI(title="p3m-serve", docs_url=None, redoc_url=None, openapi_url=None)
    page = importlib.resources.files("p3m_jax.serve").joinpath("index.html").read_text(encoding="utf-8")

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return _error(error.status, error.message, error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return _error(error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        return _error(500, f"internal error ({type(error).__name__}); the server's log has the details")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": _PAGE_POLICY, "Cache-Control": "no-cache"})

    @app.get("/healthz")
    async def healthz():
        return {
            **service.health(),
            "limits": {"max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels},
        }

    @app.get("/samples/{number}.png")
    async def sample(number: int):
        if not 1 <= number <= len(SAMPLE_SEEDS):
            raise RequestError(404, f"no sample {number}; the samples are 1 to {len(SAMPLE_SEEDS)}")
        return Response(sample_png(number - 1), media_type="image/png")

    @app.post("/v1/matte")
    async def matte(request: Request):
        body = await read_body(request, limits)
        job = parse_job(parse_form(body, request.headers.get("content-type", "")), service.strategy, limits.max_pixels)
        del body  # the form's fields hold the photo now; the raw body is not kept as a second copy
        png = await service.submit(job)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    app.add_middleware(RequestLog)
    return app
