"""Robust image reading and atomic PNG writing for evaluation and prediction.

`load_rgb` reads JPEG, PNG, WebP (and anything else Pillow opens) as RGB uint8 (H, W, 3): EXIF orientation is
applied, grayscale is replicated to 3 channels, an alpha channel is dropped (as the authors' `[:, :, :3]`),
16-bit images are scaled to 8 bits. `load_gray` reads a matte/trimap/facemask as (H, W) uint8 (channel 0 of
colour files, as the authors' `trim_img`). Failures raise `ImageReadError` naming the file.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

from p3m_jax.common import storage
from p3m_jax.common.fileio import atomic_write

# Portraits can be large; allow up to ~400 megapixels before Pillow's decompression-bomb guard.
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, 400_000_000)


class ImageReadError(ValueError):
    """An image file could not be read; the message names the file."""


def _open(path) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(storage.resolve(path).read_bytes()) if storage.is_remote(path) else path)
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, DecompressionBombError...)
        raise ImageReadError(f"cannot read image {os.fspath(path)}: {error}") from error


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if array.dtype.kind in "iu":
        top = 65535 if array.max(initial=0) > 255 else 255
        return np.round(np.clip(array, 0, top) * (255.0 / top)).astype(np.uint8)
    return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)  # float images in [0, 1]


def load_rgb(path) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image file, upright per its EXIF orientation."""
    return rgb_of(_open(path))


def rgb_of(image: Image.Image) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a decoded, upright Pillow image (what `load_rgb` returns for its file)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image)))
    if image.mode != "RGB":
        # RGBA/LA/P/CMYK/L: Pillow's conversion drops alpha without compositing, like the authors' [:, :, :3]
        image = image.convert("RGB")
    return np.asarray(image, np.uint8).copy()


def load_gray(path) -> np.ndarray:
    """(H, W) uint8 of a single-channel map; channel 0 of a colour file."""
    image = _open(path)
    array = np.asarray(image)
    if array.ndim == 3:
        array = array[..., 0]
    return _to_uint8(array).copy()


def save_png(path, array: np.ndarray) -> None:
    """Writes a uint8 (H, W), (H, W, 3) or (H, W, 4) array as PNG atomically (temp file + rename)."""
    with atomic_write(path, "wb") as handle:
        handle.write(png_bytes(array))


def png_bytes(array: np.ndarray) -> bytes:
    """The PNG file `save_png` writes for a uint8 (H, W), (H, W, 3) or (H, W, 4) array."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
