"""The command line of `p3m_jax.serve` (``python -m p3m_jax.serve``, ``p3m-serve``): flags, the
checks that fail with one ``error:`` line before the server starts, and uvicorn."""

from __future__ import annotations

import socket
import sys
import time

from p3m_jax import serve
from p3m_jax.common import cli
from p3m_jax.common.compilation_cache import enable_for_command
from p3m_jax.inference import strategies
from p3m_jax.inference.export_formats import ExportedPredictor
from p3m_jax.inference.loading import CHECKPOINT_ERRORS, load_pretrained
from p3m_jax.models import ARCHITECTURES

try:  # the serve extra; without it the command says how to install it
    import uvicorn

    from p3m_jax.serve import app as serve_app
except ImportError as error:
    uvicorn = serve_app = None
    _MISSING = error

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_args(argv=None):
    parser = cli.ArgumentParser("python -m p3m_jax.serve", serve.__doc__)
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="p3m-jax checkpoint, training workdir or authors' .pth")
    weights.add_argument("--exported", help="a StableHLO or ONNX file of python -m p3m_jax.export")
    parser.add_argument("--arch", default=None, choices=sorted(ARCHITECTURES), help="required for a .pth")
    cli.add_ema_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument(
        "--strategy", default="hybrid", choices=strategies.STRATEGIES, help="the strategy of a request without one"
    )
    parser.add_argument("--bucket", type=int, default=0, help="pad network inputs up to multiples of this (0: exact)")
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype (bfloat16: GPUs/TPUs)"
    )
    parser.add_argument("--queue", type=int, default=8, help="requests that may wait while the model runs one")
    parser.add_argument("--max_megabytes", type=float, default=32.0, help="largest upload, in megabytes")
    parser.add_argument("--max_megapixels", type=float, default=40.0, help="largest photo, in megapixels")
    parser.add_argument("--read_timeout", type=float, default=60.0, help="seconds an upload may take")
    parser.add_argument("--max_connections", type=int, default=64, help="open connections at most (more: 503)")
    parser.add_argument(
        "--compile_at_start",
        action="store_true",
        help="compile the network for the sample portraits' size while the server starts",
    )
    cli.add_cache_dir_argument(parser)
    args = parser.parse_args(argv)
    if args.ema and args.exported:
        parser.error("--ema picks a training workdir's EMA weights: use it with --checkpoint")
    if args.bucket < 0 or args.bucket % 32:
        parser.error(f"--bucket must be 0 or a positive multiple of 32, got {args.bucket}")
    if args.queue < 0 or args.max_connections < 1:
        parser.error("--queue must be 0 or more and --max_connections 1 or more")
    if min(args.max_megabytes, args.max_megapixels, args.read_timeout) <= 0:
        parser.error("--max_megabytes, --max_megapixels and --read_timeout must be positive")
    return args


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), before the model loads: a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def _load(args):
    if args.exported:
        return ExportedPredictor(args.exported)
    return load_pretrained(args.checkpoint, args.arch, dtype=args.dtype, ema=args.ema)


def _report_compile(future, start: float) -> None:
    error = future.exception() if not future.cancelled() else None
    if error is None:
        print(f"compiled for the sample portraits in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    else:
        print(f"compiling for the sample portraits failed: {error}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    if serve_app is None:
        print(f'error: p3m-serve needs the serve extra: pip install "p3m-jax[serve]" ({_MISSING})', file=sys.stderr)
        return 2
    with cli.routine_logs_quiet():  # the libraries' routine lines, for this command's work only
        return _run(args)


def _run(args) -> int:
    enable_for_command(args.cache_dir)
    try:
        sock = listen(args.host, args.port)
        predictor = _load(args)
    except (*CHECKPOINT_ERRORS, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"loaded {predictor.describe()}")
    limits = serve_app.Limits(
        max_bytes=int(args.max_megabytes * 1e6),
        max_pixels=int(args.max_megapixels * 1e6),
        queue=args.queue,
        read_timeout=args.read_timeout,
    )
    service = serve_app.MatteService(predictor, args.strategy, args.bucket, args.queue)
    if args.compile_at_start:
        start = time.perf_counter()
        service.compile_samples().add_done_callback(lambda future: _report_compile(future, start))
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving on http://{host}:{args.port}/ (photos stay in memory: never written to disk or logged)")
    if args.host not in _LOOPBACK:
        print(
            f"warning: listening on {args.host}: anyone who can reach this machine can send photos; "
            "put it behind a reverse proxy with TLS and authentication",
            file=sys.stderr,
        )
    sys.stdout.flush()
    config = uvicorn.Config(
        serve_app.create_app(service, limits),
        log_level="warning",  # uvicorn's own lines: warnings and errors; requests are logged by the app
        access_log=False,
        limit_concurrency=args.max_connections,
        timeout_graceful_shutdown=5,
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        service.close()
        sock.close()
    return 0
