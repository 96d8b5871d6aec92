"""Converts an authors' PyTorch checkpoint into a p3m-jax model checkpoint (orbax).

    python -m p3m_jax.convert --arch resnet34 --checkpoint IN.pth --output OUT_DIR

Reading the ``.pth`` needs PyTorch (the ``torch`` extra: ``pip install -c requirements.lock ".[torch]"``
in a checkout); the converted checkpoint loads without it: ``p3m_jax.load_pretrained(OUT_DIR)``.
"""

from __future__ import annotations

import sys

from p3m_jax.common import cli, storage
from p3m_jax.models import ARCHITECTURES
from p3m_jax.weights import model_checkpoint
from p3m_jax.weights.initialize import variables_from_torch
from p3m_jax.weights.torch_import import CheckpointImportError


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser("python -m p3m_jax.convert", __doc__)
    parser.add_argument("--arch", required=True, choices=sorted(ARCHITECTURES), help="the variant the file holds")
    parser.add_argument("--checkpoint", required=True, help="the authors' .pth / .pth.tar to convert")
    parser.add_argument("--output", required=True, help="folder to write the p3m-jax checkpoint to (must not exist)")
    parser.add_argument(
        "--backbone_only",
        action="store_true",
        help="the file is an ImageNet-pretrained backbone: load the encoder, initialize the decoder",
    )
    parser.add_argument("--seed", type=int, default=0, help="init seed for what the checkpoint does not hold")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    try:
        variables, report = variables_from_torch(
            args.checkpoint, args.arch, backbone_only=args.backbone_only, seed=args.seed
        )
        out = model_checkpoint.save_model_checkpoint(args.output, args.arch, variables, overwrite=args.overwrite)
    except (CheckpointImportError, FileNotFoundError, FileExistsError, ImportError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
