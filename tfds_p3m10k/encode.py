"""Turns validated P3M-10k records into TFDS example dicts (bytes, no TensorFlow).

Images are passed to TFDS as encoded bytes, which TFDS stores unchanged: the
release's JPEG bytes are kept as they are. Single-channel 8-bit PNG masks are also
kept; other masks (3-channel, palette) are reduced to channel 0 and re-encoded as
lossless PNG. Runs in worker processes, so it imports no TFDS.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from tfds_p3m10k import release_layout
from tfds_p3m10k import maps

# Stored where a map does not exist for an example (see `has_facemask`,
# `has_fg_bg`): 1x1 black images, so that code that forgets the flag fails on
# the shape instead of silently training on zeros.
PLACEHOLDER_GREY = maps.encode_png(np.zeros((1, 1), np.uint8))
PLACEHOLDER_RGB = maps.encode_png(np.zeros((1, 1, 3), np.uint8))

# Quality of the JPEGs of estimated fg/bg (PNG would be ~8x larger at 1080p).
ESTIMATED_FG_BG_JPEG_QUALITY = 95


def _decode(ref: release_layout.FileRef) -> Image.Image:
    image = Image.open(io.BytesIO(ref.read_bytes()))
    image.load()
    return image


def _grey_bytes(ref: release_layout.FileRef, as_is: bool) -> bytes:
    """The file's bytes if they decode to plain HxW uint8, else channel 0 as PNG."""
    if as_is:
        return ref.read_bytes()
    return maps.encode_png(maps.first_channel(_decode(ref)))


def _rgb_bytes(ref: release_layout.FileRef, as_is: bool) -> bytes:
    if as_is:
        return ref.read_bytes()
    return maps.encode_png(np.asarray(_decode(ref).convert("RGB")))


def estimate_fg_bg(image: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background (uint8 HxWx3) by pymatting's `estimate_foreground_ml`."""
    from pymatting import estimate_foreground_ml  # pylint: disable=g-import-not-at-top

    image_f = image.astype(np.float64) / 255.0
    alpha_f = alpha.astype(np.float64) / 255.0
    fg, bg = estimate_foreground_ml(image_f, alpha_f, return_background=True)
    to_u8 = lambda x: np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    return to_u8(fg), to_u8(bg)


def worker_init() -> None:
    """Process-pool initializer: one numba thread per worker (workers are the parallelism)."""
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")


def encode_record(job: tuple[release_layout.Record, release_layout.FileFacts, bool]) -> tuple[str, dict]:
    """(record, facts, estimate_fg_bg) -> (key, example dict of the p3m10k features)."""
    record, facts, estimate = job
    alpha_bytes = _grey_bytes(record.mask, facts.mask_as_is)
    alpha = None
    if record.trimap is not None:
        trimap_bytes = _grey_bytes(record.trimap, facts.trimap_as_is)
    else:
        alpha = maps.first_channel(_decode(record.mask))
        kernel = maps.trimap_kernel_size(facts.height, facts.width)
        trimap_bytes = maps.encode_png(maps.derive_trimap(alpha, kernel))
    example = {
        "image": _rgb_bytes(record.image, facts.image_as_is),
        "alpha": alpha_bytes,
        "trimap": trimap_bytes,
        "facemask": PLACEHOLDER_GREY,
        "has_facemask": False,
        "fg": PLACEHOLDER_RGB,
        "bg": PLACEHOLDER_RGB,
        "has_fg_bg": False,
        "name": record.name,
        "is_blurred": record.is_blurred,
    }
    if record.facemask is not None:
        example["facemask"] = _grey_bytes(record.facemask, facts.facemask_as_is)
        example["has_facemask"] = True
    if estimate and record.split == "train":
        if alpha is None:
            alpha = maps.first_channel(_decode(record.mask))
        image = np.asarray(_decode(record.image).convert("RGB"))
        fg, bg = estimate_fg_bg(image, alpha)
        example["fg"] = maps.encode_jpeg(fg, ESTIMATED_FG_BG_JPEG_QUALITY)
        example["bg"] = maps.encode_jpeg(bg, ESTIMATED_FG_BG_JPEG_QUALITY)
        example["has_fg_bg"] = True
    elif record.fg is not None and record.bg is not None:
        example["fg"] = _rgb_bytes(record.fg, facts.fg_bg_as_is)
        example["bg"] = _rgb_bytes(record.bg, facts.fg_bg_as_is)
        example["has_fg_bg"] = True
    return record.name, example
