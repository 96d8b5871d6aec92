"""Small numpy/OpenCV helpers for matting maps (alpha, trimap, facemask).

Kept free of TensorFlow Datasets imports so that worker processes and other
modules can use them cheaply.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

TRIMAP_VALUES = (0, 128, 255)

# The trimap stored for `train` (where the release has none) uses the training
# rule of docs/design.md section 5 with this fixed kernel, scaled to the image size:
# 25 px for a 1080 px short side, never below 3 px.
TRAIN_TRIMAP_KERNEL_AT_1080 = 25


def trimap_kernel_size(height: int, width: int) -> int:
    """Returns the fixed elliptical kernel size used for derived trimaps."""
    return max(3, int(round(TRAIN_TRIMAP_KERNEL_AT_1080 * min(height, width) / 1080)))


def derive_trimap(alpha: np.ndarray, kernel_size: int) -> np.ndarray:
    """Trimap (uint8 0/128/255) from an alpha matte (uint8 HxW).

    255 where `alpha == 255` survives an erosion, 0 outside the dilation of
    `alpha > 0`, 128 in between; elliptical kernel of `kernel_size` pixels.
    """
    if alpha.ndim == 3:
        alpha = alpha[..., 0]
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kernel_size, kernel_size))
    solid = cv2.erode((alpha == 255).astype(np.uint8), kernel)
    reach = cv2.dilate((alpha > 0).astype(np.uint8), kernel)
    trimap = np.zeros(alpha.shape, np.uint8)
    trimap[reach > 0] = 128
    trimap[solid > 0] = 255
    return trimap


def first_channel(pil_image: Image.Image) -> np.ndarray:
    """Channel 0 of a mask image as uint8 HxW (3-channel masks: take channel 0).

    Raises:
      ValueError: for modes that do not hold 8-bit values (e.g. 16-bit, float).
    """
    mode = pil_image.mode
    if mode == "1":
        return np.asarray(pil_image.convert("L"))
    if mode == "P":
        pil_image = pil_image.convert("RGBA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        raise ValueError(f"unsupported mask mode {mode!r} (expected 8-bit grey or RGB)")
    array = np.asarray(pil_image)
    return array if array.ndim == 2 else np.ascontiguousarray(array[..., 0])


def is_plain_grey_png(pil_image: Image.Image) -> bool:
    """True when the file's own bytes decode to the same HxW uint8 everywhere.

    Such files are stored as they are; others are re-encoded (losslessly) from
    channel 0, because OpenCV and PIL disagree on palettes and transparency.
    """
    return pil_image.format == "PNG" and pil_image.mode == "L" and "transparency" not in pil_image.info


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    """Lossless PNG bytes of a uint8 HxW, HxWx1 or HxWx3 array (zlib level 0-9)."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of a uint8 HxWx3 array."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
