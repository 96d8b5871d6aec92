"""Single-image inference: `predict_alpha` (RESIZE, HYBRID) per variant, ours and the authors' PyTorch side by side.

    python benchmarks/bench_predict.py [--arch resnet34 swin_t vitae_s] [--strategy hybrid resize] \
        [--image PHOTO] [--height 1080 --width 1620] [--repeats 2] [--bucket 0] [--dtype float32] \
        [--torch --authors_repo DIR] [--onnx]

The photo (default: the sample's P3M-500-NP portrait) is resized to --height x --width (the issue's 1080x1620)
and converted to RGB uint8. Weights are random (timing does not depend on them).

Ours: `p3m_jax.inference.strategies.predict_alpha` through a `NetworkRunner` with `--bucket` (0 = exact shapes, the
`predict` command's default), the persistent compilation cache off (unless --cache_dir), so "first" is a cold
first image in a fresh process: compilation of every network program of the strategy included. "steady" is the median of
`--repeats` later calls. Where the time goes (steady state): host resizing and normalisation of the inputs,
each network pass split into encoder and decoder (the encoder run alone, jitted, on the same input), and the
host-side resizing of the outputs back to the image size.

ONNX (`--onnx`, the export extra): each variant exported by `p3m_jax.inference.export_formats.export_onnx` at the
exact network input sizes of the strategy (one fixed-size file per size) and run by onnxruntime's CPU provider
through the same strategy code; "first" includes creating the sessions (not the export). The table also
counts the pixels where its 8-bit matte differs from ours.

Theirs (`--torch`, needs PyTorch and scikit-image): `inference_img_p3m` from the authors' `core/infer.py`
(github.com/ViTAE-Transformer/P3M-Net, a checkout given by --authors_repo, imported at run time and never
vendored) on the same image under `torch.no_grad()`, float32, with their model's forward timed
separately; on a machine with a GPU their model runs there (their code moves the input to CUDA whenever one is
present). Their module imports torchvision only for `transforms.Normalize`; when torchvision is absent a
minimal stand-in is registered. Ours, theirs and onnxruntime alternate call by call, so all see the same
machine load.
"""

from __future__ import annotations

import os
import pathlib
import platform
import statistics
import sys
import time
import types

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p3m_jax.common import cli  # noqa: E402


def load_photo(path: str | None, height: int, width: int):
    """The photo at ``path`` resized to height x width RGB, or without a path a smooth random image
    (the network's speed does not depend on what the photo shows)."""
    import cv2
    import numpy as np

    if path is None:
        noise = np.random.default_rng(0).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        return np.ascontiguousarray(cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC))
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise SystemExit(f"cannot read {path}")
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image[..., ::-1])


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


class OurBreakdown:
    """Steady-state time per part of one `predict_alpha` call (ours)."""

    def __init__(self, predictor, bucket):
        import jax

        from p3m_jax.inference import strategies as inference

        self.inference = inference
        self.runner = inference.NetworkRunner(predictor, bucket or None)
        model = predictor.model
        self.encoder = jax.jit(lambda v, x: model.apply(v, x, False, method=lambda m, a, t: m.encoder(a, t)))
        self.predictor = predictor

    def _encoder_time(self, x):
        import jax

        x = self.runner.pad(x)
        jax.block_until_ready(self.encoder(self.predictor.variables, x[None]))  # compile
        start = time.perf_counter()
        jax.block_until_ready(self.encoder(self.predictor.variables, x[None]))
        return time.perf_counter() - start

    def __call__(self, image, strategy: str) -> dict[str, float]:
        inf = self.inference
        image01 = inf._check_image(image)  # pylint: disable=protected-access
        parts = {}
        x, parts["resize inputs"] = _timed(inf._network_input, image01, inf.GLOBAL_RATIO)  # noqa
        first_outputs = ("fusion",) if strategy == "resize" else ("global",)
        out, parts["net (half size)"] = _timed(self.runner, x, first_outputs)
        parts["  encoder (half)"] = self._encoder_time(x)
        size = image.shape[:2]
        if strategy == "resize":
            _, parts["resize outputs"] = _timed(inf.resize_like_skimage, out["fusion"][..., 0], size)
            return parts
        trimap01 = inf.trimap_from_logits(out["global"]).astype("float64") / 255.0
        _, parts["resize outputs"] = _timed(inf.resize_like_skimage, trimap01, size)
        x, t = _timed(inf._network_input, image01, inf.LOCAL_RATIO)  # noqa
        parts["resize inputs"] += t
        out, parts["net (full size)"] = _timed(self.runner, x, ("local",))
        parts["  encoder (full)"] = self._encoder_time(x)
        _, t = _timed(inf.resize_like_skimage, out["local"][..., 0], size)
        parts["resize outputs"] += t
        return parts


def _install_normalize_stand_in():
    """Their `inference_once` uses `torchvision.transforms.Normalize`; without torchvision (PyPI's does not
    import beside this machine's CPU torch) `authors_torch` registers an empty module: add it there."""
    import importlib

    import torch

    transforms = importlib.import_module("torchvision.transforms")
    if hasattr(transforms, "Normalize"):
        return

    class Normalize:
        def __init__(self, mean, std):
            self.mean = torch.tensor(mean)[:, None, None]
            self.std = torch.tensor(std)[:, None, None]

        def __call__(self, x):
            return (x - self.mean) / self.std

    transforms.Normalize = Normalize


def make_authors(arch: str, authors_repo: str):
    """(predict(image, strategy) -> alpha, forward(scaled image) -> outputs) from the authors' code."""
    import numpy as np
    import torch

    from authors_torch import install_timm_stand_in

    core = str(pathlib.Path(authors_repo) / "core")
    if core not in sys.path:
        sys.path.insert(0, core)
    install_timm_stand_in()
    _install_normalize_stand_in()
    import infer  # the authors' core/infer.py, at run time
    from network import build_model as authors_build_model

    torch.set_flush_denormal(True)  # as in authors_torch: XLA:CPU flushes denormals too
    if not torch.cuda.is_available():
        # Their Swin-T builds its attention mask with `.cuda()` at every new resolution (their inference is
        # CUDA-only); on a CPU-only PyTorch, `.cuda()` is made the identity so their code runs unchanged.
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.manual_seed(0)
    name = {"resnet34": "r34", "swin_t": "swin", "vitae_s": "vitae"}[arch]
    model = authors_build_model(name, pretrained=False).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)  # their `inference_once` moves its input to CUDA whenever a GPU is there

    def predict(image, strategy):
        args = types.SimpleNamespace(test_choice=strategy.upper(), dataset="P3M10K", arch=name)
        with torch.no_grad():
            return infer.inference_img_p3m(args, model, image)

    def forward(x):
        with torch.no_grad():
            outputs = model(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None].float().to(device))
            return [o.cpu() for o in outputs]  # waits for the device, as their inference does

    return predict, forward


class OnnxBySize:
    """ONNX files of one variant, one per network input size, run by onnxruntime: `forward` picks the
    file of the input's size (exported on first need, outside the timed calls via `prepare`)."""

    def __init__(self, predictor, folder):
        self.predictor, self.folder, self.files = predictor, pathlib.Path(folder), {}

    def prepare(self, sizes):
        from p3m_jax.inference import export_formats

        for size in sizes:
            if size not in self.files:
                path = self.folder / f"{self.predictor.arch}_{size[0]}x{size[1]}.onnx"
                export_formats.export_onnx(self.predictor, path, size=size)
                self.files[size] = path

    def open_sessions(self):
        from p3m_jax.inference import export_formats

        self.sessions = {size: export_formats.ExportedPredictor(path) for size, path in self.files.items()}

    def close_sessions(self):
        self.sessions = {}

    def forward(self, x, outputs=None):
        return self.sessions[tuple(x.shape[1:3])].forward(x, outputs)


def main() -> int:
    parser = cli.ArgumentParser("python benchmarks/bench_predict.py", __doc__)
    parser.add_argument("--arch", nargs="+", default=["resnet34", "swin_t", "vitae_s"])
    parser.add_argument("--strategy", nargs="+", default=["hybrid", "resize"], choices=["hybrid", "resize"])
    parser.add_argument("--image", default=None, help="a photo (default: a smooth random image)")
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--width", type=int, default=1620)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--bucket", type=int, default=0, help="NetworkRunner bucket (0: exact shapes, the `predict` default)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--torch", action="store_true", help="time the authors' PyTorch inference side by side")
    parser.add_argument("--authors_repo", default=None, help="checkout of the authors' repository (for --torch)")
    parser.add_argument("--onnx", action="store_true", help="time the exported ONNX file in onnxruntime too")
    parser.add_argument("--no_breakdown", action="store_true")
    parser.add_argument(
        "--cache_dir",
        default=None,
        help="use JAX's persistent compilation cache here (run twice: "
        "the second run's 'first' is a first image with a warm cache, as `predict` has by default)",
    )
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from p3m_jax.inference import strategies as inference
    from p3m_jax.common.compilation_cache import enable_compilation_cache

    if args.cache_dir:
        enable_compilation_cache(args.cache_dir)
    else:
        jax.config.update("jax_enable_compilation_cache", False)  # a cold first call, whatever the user's setup
    from p3m_jax.inference.predictor import Predictor

    if args.torch and not args.authors_repo:
        parser.error("--torch needs --authors_repo DIR (a checkout of github.com/ViTAE-Transformer/P3M-Net)")
    image = load_photo(args.image, args.height, args.width)
    device = jax.devices()[0]
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; jax {jax.__version__} "
        f"on {device.platform} ({device.device_kind}); image {args.image} at {args.height}x{args.width}; "
        f"bucket {args.bucket}; ours {args.dtype}" + ("; theirs PyTorch float32" if args.torch else "")
    )
    rows = []
    for arch in args.arch:
        predictor = Predictor.random(arch, dtype=jnp.dtype(args.dtype))
        authors = make_authors(arch, args.authors_repo) if args.torch else None
        onnx = None
        if args.onnx:
            import tempfile

            onnx = OnnxBySize(predictor, tempfile.mkdtemp(prefix="p3m_onnx_"))
            ratios = {"resize": [inference.GLOBAL_RATIO], "hybrid": [inference.GLOBAL_RATIO, inference.LOCAL_RATIO]}
            onnx.prepare(
                {inference.protocol_size(args.height, args.width, r) for s in args.strategy for r in ratios[s]}
            )
        for strategy in args.strategy:
            runner = inference.NetworkRunner(predictor, args.bucket or None)
            alpha, first = _timed(inference.predict_alpha, runner, image, strategy)
            onnx_first = onnx_steady = differing = None
            if onnx is not None:
                start = time.perf_counter()
                onnx.open_sessions()
                onnx_alpha = inference.predict_alpha(onnx, image, strategy)
                onnx_first = time.perf_counter() - start
                diff = inference.quantize(onnx_alpha).astype(int) - inference.quantize(alpha).astype(int)
                differing = (int((diff != 0).sum()), int(abs(diff).max()))
            their_first = _timed(authors[0], image, strategy)[1] if authors else None
            # The runtimes alternate call by call, so that all see the same machine load.
            ours, theirs, onnx_times = [], [], []
            for _ in range(args.repeats):
                ours.append(_timed(inference.predict_alpha, runner, image, strategy)[1])
                if authors:
                    theirs.append(_timed(authors[0], image, strategy)[1])
                if onnx is not None:
                    onnx_times.append(_timed(inference.predict_alpha, onnx, image, strategy)[1])
            if onnx is not None:
                onnx.close_sessions()  # their buffers, before the next strategy's
                onnx_steady = statistics.median(onnx_times)
                print(
                    f"{arch} {strategy}: onnxruntime first {onnx_first:.2f}s steady {onnx_steady:.2f}s; 8-bit "
                    f"matte vs ours: {differing[0]} pixels differ, by at most {differing[1]}",
                    flush=True,
                )
            steady = statistics.median(ours)
            their_steady = statistics.median(theirs) if theirs else None
            shapes = ", ".join(f"{h}x{w}" for h, w in runner.input_shapes)
            rows.append(
                (arch, strategy, first, steady, their_first, their_steady, shapes, onnx_first, onnx_steady, differing)
            )
            print(
                f"{arch} {strategy}: ours first {first:.2f}s steady {steady:.2f}s (inputs {shapes})"
                + (
                    f"; theirs first {their_first:.2f}s steady {their_steady:.2f}s, ours/theirs "
                    f"{steady / their_steady:.2f}"
                    if authors
                    else ""
                ),
                flush=True,
            )
            if not args.no_breakdown:
                parts = OurBreakdown(predictor, args.bucket)(image, strategy)
                text = ", ".join(f"{k.strip()} {v:.2f}s" for k, v in parts.items())
                if authors and strategy == "hybrid":
                    for ratio, label in ((inference.GLOBAL_RATIO, "half"), (inference.LOCAL_RATIO, "full")):
                        h, w = inference.protocol_size(args.height, args.width, ratio)
                        x = inference.normalize(inference.resize_like_skimage(image / 255.0, (h, w)))
                        authors[1](x)
                        text += f"; theirs net ({label}) {_timed(authors[1], x)[1]:.2f}s"
                print("  steady-state parts: " + text, flush=True)
        del predictor, authors

    print(
        "\narch | strategy | ours first | ours steady | first/steady"
        + (" | theirs first | theirs steady | ours/theirs steady" if args.torch else "")
        + (" | onnxruntime first | onnxruntime steady | pixels differing (max)" if args.onnx else "")
    )
    for arch, strategy, first, steady, their_first, their_steady, _, onnx_first, onnx_steady, differing in rows:
        line = f"{arch} | {strategy} | {first:.2f}s | {steady:.2f}s | {first / steady:.2f}"
        if args.torch:
            line += f" | {their_first:.2f}s | {their_steady:.2f}s | {steady / their_steady:.2f}"
        if args.onnx:
            line += f" | {onnx_first:.2f}s | {onnx_steady:.2f}s | {differing[0]} ({differing[1]})"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
