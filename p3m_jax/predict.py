"""Alpha mattes for your own images.

    python -m p3m_jax.predict --checkpoint CKPT [--arch resnet34] --input FILE_OR_DIR --output DIR \\
        [--strategy resize|hybrid] [--bucket 128] [--dtype float32|bfloat16]
    python -m p3m_jax.predict --exported model.stablehlo|model.onnx --input FILE_OR_DIR --output DIR ...

Cutouts and backgrounds: `--foreground estimate` gives `<name>_rgba.png` the person's own colours where the
matte mixes them with the old background (pymatting's `estimate_foreground_ml`), so no halo of the old
background shows on a new one; `--background COLOR|IMAGE` (`white`, `#00b140`, `0,177,64`, or an image
file, scaled to cover the photo and cropped at its centre) also writes `<name>_composite.png`, the person
over that background. An image's files are written all or none.

`--exported` runs a file of `python -m p3m_jax.export` instead of the Flax model (no weights to load, no
model to build); a fixed-size file (ONNX) takes images whose network input fits its size (padded up to it)
and skips larger ones, saying so: a StableHLO file of ResNet-34 takes any size (docs/deploy.md).

Writes `<name>_alpha.png` (8-bit alpha) and `<name>_rgba.png` (the image with that alpha as its alpha
channel, colours not premultiplied) per input image. Reads JPEG, PNG and WebP, grayscale and RGBA (alpha
dropped), and applies EXIF orientation. Like the authors' sample inference, an image whose short side exceeds
1080 px is downscaled to 1080 px (bilinear) before the strategy runs, and the alpha is scaled back to the
original size. Inputs that share a stem (`portrait.jpg`, `portrait.png`) are named after their whole file
name instead (`portrait.jpg_alpha.png`). A file that cannot be read or processed is reported and skipped;
the exit status is 1 if any file failed, and 2 when the input or the checkpoint is missing or unreadable or
the output folder cannot be written (one `error:` line, before the model is loaded). Outputs are written
atomically; an output folder that this run created is removed again if nothing could be written. Runs on
whatever JAX backend is installed (CPU, GPU, TPU).

Sizes: the network runs at multiples of 32, and every distinct input size is compiled once (kept in JAX's
persistent cache, so once per machine). A single image runs at its exact size. For several images the
network inputs are padded (symmetric reflection) up to multiples of `--bucket` (128 by default, as
`evaluate`'s): photos of nearly equal size share one compilation, at the cost of up to 127 px more per
side; `--bucket 0` runs every image at its exact size. HYBRID computes `global` only in its half-size pass
and `local` only in its full-size pass, and compiles both programs at once.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from p3m_jax.common import cli, fileio, image_io, storage
from p3m_jax.common.compilation_cache import enable_for_command
from p3m_jax.inference import compositing, strategies
from p3m_jax.inference.export_formats import ExportedPredictor
from p3m_jax.inference.loading import CHECKPOINT_ERRORS, load_pretrained
from p3m_jax.models import ARCHITECTURES

SHORT_SIDE_LIMIT = 1080  # the authors' SHORTER_PATH_LIMITATION
_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def list_inputs(path) -> list[pathlib.Path]:
    """The image files to process: `path` itself, or the image files directly inside the folder `path`."""
    path = storage.as_path(path)
    if storage.is_remote(path):
        storage.check_bucket(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"no image files ({', '.join(_EXTENSIONS)}) in {path}")
        return files
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    return [path]


def output_names(inputs) -> tuple[dict[pathlib.Path, str], list[str]]:
    """The name each input's outputs start with: its stem (``portrait.jpg`` -> ``portrait_alpha.png``),
    or its whole file name where several inputs share a stem (``portrait.jpg`` and ``portrait.png``
    -> ``portrait.jpg_alpha.png`` and ``portrait.png_alpha.png``), so no output overwrites another.
    Returns the names and the file names that needed the second rule."""
    by_stem: dict[str, list[pathlib.Path]] = {}
    for path in inputs:
        by_stem.setdefault(storage.as_path(path).stem.lower(), []).append(storage.as_path(path))
    names, shared = {}, []
    for paths in by_stem.values():
        for path in paths:
            names[path] = path.name if len(paths) > 1 else path.stem
        if len(paths) > 1:
            shared.extend(p.name for p in paths)
    return names, shared


def predict_image(runner, image: np.ndarray, strategy: str) -> np.ndarray:
    """8-bit alpha (H, W) of an RGB uint8 image of any size (large ones run at a 1080 px short side)."""
    import cv2

    height, width = image.shape[:2]
    work = image
    if min(height, width) > SHORT_SIDE_LIMIT:
        scale = SHORT_SIDE_LIMIT / min(height, width)
        size = (max(1, int(round(width * scale))), max(1, int(round(height * scale))))
        work = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    alpha = strategies.predict_alpha(runner, work, strategy)
    if work.shape[:2] != (height, width):
        alpha = cv2.resize(alpha.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    return strategies.quantize(alpha)


def parse_args(argv=None):
    parser = cli.ArgumentParser("python -m p3m_jax.predict", __doc__)
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="p3m-jax checkpoint, training workdir or authors' .pth")
    weights.add_argument("--exported", help="a StableHLO or ONNX file of python -m p3m_jax.export")
    parser.add_argument("--arch", default=None, choices=sorted(ARCHITECTURES), help="required for a .pth")
    cli.add_ema_argument(parser)
    parser.add_argument("--input", required=True, help="an image file or a folder of images")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument(
        "--strategy", default="hybrid", choices=strategies.STRATEGIES, help="the paper's inference strategy"
    )
    parser.add_argument(
        "--bucket",
        type=int,
        default=strategies.BUCKET,
        help="with several images, pad network inputs up to multiples of this (0: exact sizes)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="compute dtype; bfloat16 is for GPUs/TPUs (parameters stay float32, outputs are float32)",
    )
    cli.add_cache_dir_argument(parser)
    parser.add_argument(
        "--foreground",
        default="original",
        choices=compositing.FOREGROUNDS,
        help="colours of the cutout: the photo's, or the person's own estimated where the matte is soft",
    )
    parser.add_argument(
        "--background", default=None, help="also write <name>_composite.png over this colour or image file"
    )
    args = parser.parse_args(argv)
    if args.ema and args.exported:
        parser.error("--ema picks a training workdir's EMA weights: use it with --checkpoint (export with --ema)")
    if args.bucket < 0 or args.bucket % 32:
        parser.error(f"--bucket must be 0 or a positive multiple of 32, got {args.bucket}")
    return args


def run(
    predictor,
    inputs,
    output_dir,
    strategy: str = "hybrid",
    bucket: int | None = None,
    progress: bool = True,
    output_created: bool | None = None,
    foreground: str = "original",
    background=None,
) -> tuple[list[pathlib.Path], list[tuple[pathlib.Path, str]]]:
    """Processes `inputs` (paths); returns (written alpha paths, [(failed path, reason)]).

    ``foreground``: the cutout's colours, "original" or "estimate"; ``background``: None, an (R, G, B)
    colour or an RGB image, for ``<name>_composite.png``.

    ``output_created``: whether the caller already made ``output_dir`` with `prepare_output` (None:
    prepare it here); a folder made for this run is removed again when nothing is written."""
    runner = strategies.NetworkRunner(predictor, bucket or None)
    output_dir = storage.as_path(output_dir)
    created = fileio.prepare_output(output_dir) if output_created is None else output_created
    names, shared = output_names(inputs)
    if shared:
        print(
            f"inputs that share a stem are named after their whole file name "
            f"(e.g. {shared[0]}_alpha.png): {', '.join(shared)}",
            file=sys.stderr,
        )
    written, failed = [], []
    try:
        for path in cli.progress(inputs, enabled=progress and len(inputs) > 1, desc="predict", unit="image"):
            path = storage.as_path(path)
            alpha_path = output_dir / f"{names[path]}_alpha.png"
            try:
                image = image_io.load_rgb(path)
                alpha = predict_image(runner, image, strategy)
                fg = compositing.estimate_foreground(image, alpha) if foreground == "estimate" else image
                outputs = {alpha_path: alpha, output_dir / f"{names[path]}_rgba.png": np.dstack([fg, alpha])}
                if background is not None:
                    outputs[output_dir / f"{names[path]}_composite.png"] = compositing.composite(fg, alpha, background)
                done = []
                try:
                    for out_path, array in outputs.items():
                        image_io.save_png(out_path, array)
                        done.append(out_path)
                except BaseException:
                    for out_path in done:  # all of an image's files, or none
                        if out_path.exists():
                            out_path.unlink()
                    raise
                written.append(alpha_path)
            except (image_io.ImageReadError, ValueError, OSError) as error:
                print(f"skipped {path}: {error}", file=sys.stderr)
                failed.append((path, str(error)))
    finally:
        fileio.remove_if_empty(output_dir, created)  # nothing was written: leave nothing behind
    return written, failed


def _background(text):
    """None, an (R, G, B) colour or the RGB image of a file (FileNotFoundError / ImageReadError naming it)."""
    if text is None:
        return None
    colour = compositing.parse_colour(text)
    if colour is not None:
        return colour
    if not storage.as_path(text).is_file():
        raise FileNotFoundError(f"--background {text}: neither a colour (white, #00b140, 0,177,64) nor an image file")
    return image_io.load_rgb(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    with cli.routine_logs_quiet():  # the libraries' routine lines, for this command's work only
        return _run(args)


def _run(args) -> int:
    enable_for_command(args.cache_dir)
    created = False
    try:
        inputs = list_inputs(args.input)
        background = _background(args.background)
        # Before the model loads: an unusable output folder should not cost a compile.
        created = fileio.prepare_output(args.output)
        if args.exported:
            predictor = ExportedPredictor(args.exported)
        else:
            predictor = load_pretrained(args.checkpoint, args.arch, dtype=args.dtype, ema=args.ema)
    # A missing input, checkpoint, background or output folder:
    except (*CHECKPOINT_ERRORS, OSError, image_io.ImageReadError) as error:
        fileio.remove_if_empty(args.output, created)
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"loaded {predictor.describe()}")
    bucket = args.bucket if len(inputs) > 1 else 0  # one image: its exact size
    written, failed = run(
        predictor,
        inputs,
        args.output,
        args.strategy,
        bucket,
        output_created=created,
        foreground=args.foreground,
        background=background,
    )
    print(f"wrote {len(written)} matte(s) to {args.output}" + (f"; {len(failed)} file(s) failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
