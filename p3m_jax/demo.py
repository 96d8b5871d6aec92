"""A first P3M-Net inference on a generated portrait; needs no download.

    python -m p3m_jax.demo --output demo_out [--arch resnet34] [--checkpoint PATH] [--size 256]

Renders a synthetic portrait (tfds_p3m10k.synthetic), runs P3M-Net on it and writes the
image, the true alpha and the predicted alpha as PNGs, and ``overview.png``: the image, the
predicted matte and the cutout over a checkerboard, side by side. Without ``--checkpoint`` the network
has random (untrained) weights, so the predicted matte is noise: the demo then checks the
installation and shows the API; pass converted weights (``python -m p3m_jax.convert``) for a
real matte.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from p3m_jax.common import cli, image_io, storage
from p3m_jax.inference import Predictor, load_pretrained
from p3m_jax.inference.loading import CHECKPOINT_ERRORS
from p3m_jax.inference.strategies import normalize
from p3m_jax.models import ARCHITECTURES
from tfds_p3m10k.synthetic import render_portrait


def overview(image: np.ndarray, alpha: np.ndarray, square: int = 8) -> np.ndarray:
    """(H, 3W, 3) uint8: the image, the matte, and the image composited by the matte over a
    light-grey checkerboard (what a cutout looks like in an editor)."""
    h, w = alpha.shape
    rows, cols = np.indices((h, w)) // square
    board = np.where((rows + cols) % 2 == 0, 230.0, 190.0)[..., None]
    cutout = alpha[..., None] * image + (1.0 - alpha[..., None]) * board
    matte = np.repeat(alpha[..., None] * 255.0, 3, axis=2)
    return np.round(np.concatenate([image.astype(np.float64), matte, cutout], axis=1)).clip(0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser("python -m p3m_jax.demo", __doc__)
    parser.add_argument("--output", default="demo_out", help="folder for the PNGs")
    parser.add_argument(
        "--arch", default=None, choices=sorted(ARCHITECTURES), help="required for a .pth; else resnet34"
    )
    parser.add_argument("--checkpoint", help="p3m-jax checkpoint, training workdir or authors' .pth")
    parser.add_argument("--size", type=int, default=256, help="image side, a multiple of 32")
    parser.add_argument("--seed", type=int, default=0, help="which generated portrait (and the random weights)")
    args = parser.parse_args(argv)
    if args.size <= 0 or args.size % 32:
        parser.error(f"--size must be a positive multiple of 32, got {args.size}")

    sample = render_portrait(args.seed, args.size, args.size)
    t0 = time.perf_counter()
    if args.checkpoint:
        try:
            with cli.routine_logs_quiet():  # orbax's read-only lines while it opens a workdir
                predictor = load_pretrained(args.checkpoint, args.arch)
        except CHECKPOINT_ERRORS as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"loaded {predictor.describe()}")
    else:
        predictor = Predictor.random(args.arch or "resnet34", seed=args.seed)
        print(f"{predictor.arch} with random weights (no --checkpoint): the matte will be noise")
    x = normalize(sample.image / 255.0)[None]
    t1 = time.perf_counter()
    out = predictor.forward(x)
    t2 = time.perf_counter()
    out = predictor.forward(x)  # compiled: the steady-state speed
    t3 = time.perf_counter()

    alpha = out["fusion"][0, :, :, 0]
    output = storage.as_path(args.output)
    images = {
        "image.png": sample.image,
        "alpha_true.png": sample.alpha,
        "alpha_pred.png": np.round(alpha * 255).astype(np.uint8),
        "overview.png": overview(sample.image, alpha),
    }
    for name, image in images.items():
        image_io.save_png(output / name, image)
    classes = np.bincount(out["global"][0].argmax(-1).ravel(), minlength=3) / alpha.size
    sad = np.abs(alpha - sample.alpha / 255.0).sum() / 1000
    print("outputs: " + ", ".join(f"{k} {v.shape}" for k, v in out.items()))
    print(
        f"global decision: background {classes[0]:.1%}, transition {classes[1]:.1%}, "
        f"foreground {classes[2]:.1%}; SAD vs true alpha {sad:.2f}"
    )
    print(f"model setup {t1 - t0:.1f} s, first call (compiles) {t2 - t1:.1f} s, second call {t3 - t2:.2f} s")
    print(f"wrote {args.output}/image.png, alpha_true.png, alpha_pred.png, overview.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
