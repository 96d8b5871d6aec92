"""P3M-style face obfuscation: blur, mosaic or zero the pixels of a face mask.

P3M-10k hides every training face under a Gaussian blur inside its face mask. The rules here, all scaled
by the face's size `s` (the shorter side of the bounding box of the mask's region):
  blur    Gaussian blur with sigma = 0.12 s (at least 2 px), kernel 2 * ceil(3 sigma) + 1 px;
  mosaic  the mean colour of square blocks of max(2, round(s / 10)) px (about ten blocks across);
  zero    black.
Only pixels where the mask is > 0 change; every pixel outside it is kept bit for bit.

Faces found by the detector (`face_detector.py`) become masks by `facemask_from_faces`: an ellipse
centred on each box, 1.2x its width and 1.3x its height (the detector's box runs from the brows to the
chin; the ellipse takes in the forehead, ears and jaw line), together with the box itself: the ellipse
alone leaves the box's corners out, and every pixel the detector calls face is obfuscated.
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

METHODS = ("blur", "mosaic", "zero", "none")
BLUR_SIGMA_PER_SIZE = 0.12
MOSAIC_BLOCKS_ACROSS = 10
ELLIPSE_SCALE = (1.2, 1.3)  # (width, height) of the ellipse over the detector's box


def facemask_from_faces(boxes: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """(H, W) uint8 mask, 255 inside an ellipse over each (x0, y0, x1, y1) box and inside the box, else 0."""
    mask = np.zeros((height, width), np.uint8)
    for x0, y0, x1, y1 in boxes:
        centre = (int(round((x0 + x1) / 2)), int(round((y0 + y1) / 2)))
        axes = (
            max(1, int(round((x1 - x0) * ELLIPSE_SCALE[0] / 2))),
            max(1, int(round((y1 - y0) * ELLIPSE_SCALE[1] / 2))),
        )
        cv2.ellipse(mask, centre, axes, 0, 0, 360, 255, thickness=-1)
        # Every pixel of the box too: floor/ceil so that a fractional box edge is covered.
        mask[max(0, math.floor(y0)) : max(0, math.ceil(y1)), max(0, math.floor(x0)) : max(0, math.ceil(x1))] = 255
    return mask


def _regions(facemask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) bounding boxes of the connected face regions of the mask."""
    count, _, stats, _ = cv2.connectedComponentsWithStats((facemask > 0).astype(np.uint8), connectivity=8)
    return [tuple(int(v) for v in stats[i, :4]) for i in range(1, count)]


def obfuscate(image: np.ndarray, facemask: np.ndarray, method: str) -> np.ndarray:
    """A copy of the RGB uint8 (H, W, 3) `image` with the pixels where `facemask` > 0 obfuscated."""
    if method not in METHODS:
        raise ValueError(f"unknown anonymisation {method!r}; expected one of {', '.join(METHODS)}")
    if facemask.shape[:2] != image.shape[:2]:
        raise ValueError(f"facemask is {facemask.shape[:2]} but the image is {image.shape[:2]}")
    out = image.copy()
    inside = facemask > 0
    if method == "none" or not inside.any():
        return out
    if method == "zero":
        out[inside] = 0
        return out
    height, width = image.shape[:2]
    for x, y, w, h in _regions(facemask):
        size = min(w, h)
        if method == "blur":
            sigma = max(2.0, BLUR_SIGMA_PER_SIZE * size)
            radius = int(math.ceil(3 * sigma))
            # Blur a window with a margin so that the face's edge pixels see real neighbours.
            x0, y0 = max(0, x - radius), max(0, y - radius)
            x1, y1 = min(width, x + w + radius), min(height, y + h + radius)
            window = cv2.GaussianBlur(image[y0:y1, x0:x1], (2 * radius + 1, 2 * radius + 1), sigma)
        else:
            block = max(2, int(round(size / MOSAIC_BLOCKS_ACROSS)))
            x0, y0, x1, y1 = x, y, x + w, y + h
            crop = image[y0:y1, x0:x1]
            small = cv2.resize(
                crop, (max(1, math.ceil(w / block)), max(1, math.ceil(h / block))), interpolation=cv2.INTER_AREA
            )
            window = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
        region = inside[y0:y1, x0:x1]
        out[y0:y1, x0:x1][region] = window[region]
    return out
