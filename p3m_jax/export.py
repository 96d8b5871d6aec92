"""Export a trained P3M-Net to StableHLO or ONNX.

    python -m p3m_jax.export --checkpoint CKPT [--arch vitae_s] --format stablehlo --output model.stablehlo \\
        [--size 512x512]
    python -m p3m_jax.export --checkpoint CKPT --format onnx --output model.onnx [--size 512x512] [--batch 1]

`--checkpoint` is a p3m-jax model checkpoint, a training workdir (its best checkpoint) or an authors' `.pth`
(with `--arch`). StableHLO: one file for CPU, GPU and TPU with a symbolic batch, and symbolic image sizes
(multiples of 32) where the network lowers so (ResNet-34; Swin-T and ViTAE-S export at `--size`, 512x512
unless given). Run it with `python -m p3m_jax.predict --exported FILE` or
`p3m_jax.inference.export_formats.ExportedPredictor(FILE).forward(x)`. ONNX (the `export` extra: jax2onnx,
onnx, onnxruntime): batch and size fixed at `--batch` and `--size`; input `image` (N, 3, H, W), outputs
`fusion` (the alpha), `global`, `local`. docs/deploy.md has the conventions and the onnxruntime snippet.

A missing checkpoint, a bad size or an unwritable output stops it with one `error:` line and exit status 2;
the file is written whole or not at all. A missing output folder is made (and removed again if nothing is
written into it).
"""

from __future__ import annotations

import argparse
import os
import sys

from p3m_jax.common import cli, fileio, storage
from p3m_jax.inference import export_formats
from p3m_jax.inference.loading import CHECKPOINT_ERRORS, load_pretrained
from p3m_jax.models import ARCHITECTURES


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = cli.image_size(text)
    except (ValueError, argparse.ArgumentTypeError):
        height = width = 0
    if height < 32 or width < 32 or height % 32 or width % 32:
        raise argparse.ArgumentTypeError(f"expected HxW with multiples of 32 (e.g. 512x512), got {text!r}")
    return height, width


def parse_args(argv=None):
    parser = cli.ArgumentParser("python -m p3m_jax.export", __doc__)
    parser.add_argument("--checkpoint", required=True, help="p3m-jax checkpoint, training workdir or authors' .pth")
    parser.add_argument("--arch", default=None, choices=sorted(ARCHITECTURES), help="required for a .pth")
    cli.add_ema_argument(parser)
    parser.add_argument("--format", required=True, choices=export_formats.FORMATS, help="what to write")
    parser.add_argument("--output", required=True, help="the file to write")
    parser.add_argument(
        "--size",
        type=_size,
        default=None,
        help="HxW of the input; StableHLO: unset means symbolic where the network allows it (else 512x512); "
        "ONNX: unset means 512x512",
    )
    parser.add_argument("--batch", type=int, default=1, help="ONNX: the fixed batch size")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    return args


def _output_folder(output: str) -> str:
    """The folder the exported file goes to: a gs:// prefix or a local folder."""
    if storage.is_remote(output):
        return output.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(output))


def main(argv=None) -> int:
    args = parse_args(argv)
    with cli.routine_logs_quiet():  # the libraries' routine lines, for this command's work only
        return _run(args)


def _run(args) -> int:
    if not storage.is_remote(args.output):
        args.output = os.path.expanduser(args.output)  # --output=~/... reaches us unexpanded
    folder = _output_folder(args.output)
    try:
        # Made when missing (e.g. rembg's ~/.rembg) and proven writable before the model loads.
        created = fileio.prepare_output(folder)
    except OSError as error:  # storage.StorageError too
        print(f"error: cannot write {args.output}: {error}", file=sys.stderr)
        return 2
    try:
        return _export(args)
    finally:
        fileio.remove_if_empty(folder, created)  # a folder made here, when nothing was written into it


def _export(args) -> int:
    try:
        predictor = load_pretrained(args.checkpoint, args.arch, ema=args.ema)
    except CHECKPOINT_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"loaded {predictor.describe()}")
    try:
        if args.format == "stablehlo":
            try:
                metadata = export_formats.export_stablehlo(predictor, args.output, size=args.size)
            except export_formats.ExportError as error:
                if args.size is not None:
                    raise
                print(f"{error}: exporting at 512x512")
                metadata = export_formats.export_stablehlo(predictor, args.output, size=(512, 512))
        else:
            metadata = export_formats.export_onnx(
                predictor, args.output, size=args.size or (512, 512), batch=args.batch
            )
    except ImportError as error:
        if args.format == "onnx":
            print(
                f"error: ONNX export needs the export extra (pip install 'p3m-jax[export]'): {error}", file=sys.stderr
            )
        else:
            print(f"error: {args.format} export: {error}", file=sys.stderr)
        return 2
    except (export_formats.ExportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    size = "symbolic" if metadata["height"] is None else f"{metadata['height']}x{metadata['width']}"
    batch = "symbolic" if metadata["batch"] is None else metadata["batch"]
    print(
        f"wrote {args.output} ({args.format}, {storage.size_of(args.output) / 1e6:.1f} MB): batch {batch}, "
        f"size {size}, outputs {', '.join(metadata['outputs'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
