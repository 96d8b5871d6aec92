"""Cutouts and new backgrounds from a photo and its alpha matte.

At the edges of hair a photo's pixel is a mix of the person and the background behind them; a cutout
that keeps those mixed colours shows a halo of the old background over a new one. `estimate_foreground`
solves for the person's own colours there (pymatting's multilevel `estimate_foreground_ml`, the method
of Germer et al. 2020), so that `composite(foreground, alpha, background)` puts the person on a new
background without the old one showing through.
"""

from __future__ import annotations

import re

import cv2
import numpy as np

FOREGROUNDS = ("original", "estimate")
NAMED_COLOURS = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "green": (0, 177, 64),  # chroma-key green
    "blue": (0, 71, 187),
    "grey": (128, 128, 128),
    "gray": (128, 128, 128),
}


def estimate_foreground(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The person's colours (H, W, 3) uint8 where the matte mixes them with the background."""
    from pymatting import estimate_foreground_ml  # noqa: PLC0415  (numba compiles on first use: seconds)

    fg = estimate_foreground_ml(image.astype(np.float64) / 255.0, alpha.astype(np.float64) / 255.0)
    return np.clip(np.round(fg * 255.0), 0, 255).astype(np.uint8)


def parse_colour(text: str) -> tuple[int, int, int] | None:
    """'white', '#00b140' or '0,177,64' -> (R, G, B); None when `text` is none of those."""
    text = text.strip().lower()
    if text in NAMED_COLOURS:
        return NAMED_COLOURS[text]
    if re.fullmatch(r"#[0-9a-f]{6}", text):
        return tuple(int(text[i : i + 2], 16) for i in (1, 3, 5))
    parts = text.split(",")
    if len(parts) == 3 and all(p.strip().isdigit() and int(p) <= 255 for p in parts):
        return tuple(int(p) for p in parts)
    return None


def fit_background(background: np.ndarray, height: int, width: int) -> np.ndarray:
    """`background` scaled to cover (height, width) and cropped at its centre, as a wallpaper fills a screen."""
    bh, bw = background.shape[:2]
    scale = max(height / bh, width / bw)
    size = (max(width, int(np.ceil(bw * scale))), max(height, int(np.ceil(bh * scale))))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    scaled = cv2.resize(background, size, interpolation=interpolation)
    top, left = (scaled.shape[0] - height) // 2, (scaled.shape[1] - width) // 2
    return scaled[top : top + height, left : left + width]


def composite(foreground: np.ndarray, alpha: np.ndarray, background) -> np.ndarray:
    """`alpha * foreground + (1 - alpha) * background`, rounded to uint8 (H, W, 3); `background` is an
    (R, G, B) colour or an RGB image of any size (fitted by `fit_background`)."""
    height, width = alpha.shape
    if isinstance(background, tuple):
        background = np.broadcast_to(np.asarray(background, np.uint8), (height, width, 3))
    elif background.shape[:2] != (height, width):
        background = fit_background(background, height, width)
    a = alpha.astype(np.float32)[..., None] / 255.0
    out = a * foreground.astype(np.float32) + (1.0 - a) * background.astype(np.float32)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
