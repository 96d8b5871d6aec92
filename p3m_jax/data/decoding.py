"""Decoding the stored bytes with OpenCV: colour images (JPEGs optionally at a reduced DCT scale), masks
as one grey channel, and a JPEG's size read from its header without decoding it."""

from __future__ import annotations

import struct

import cv2
import numpy as np


def is_jpeg(data: bytes) -> bool:
    return data[:2] == b"\xff\xd8"


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's SOF marker without decoding it; None if not found."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return int(height), int(width)
        pos += 2 + length
    return None


_REDUCED_COLOR = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def decode_bgr(data: bytes, reduce: int = 1) -> np.ndarray | None:
    """HxWx3 uint8 in OpenCV's BGR order (None if undecodable); JPEGs at 1/`reduce` DCT scale."""
    flag = _REDUCED_COLOR[reduce] if reduce > 1 and is_jpeg(data) else cv2.IMREAD_COLOR
    return cv2.imdecode(np.frombuffer(data, np.uint8), flag)


def decode_rgb(data: bytes) -> np.ndarray | None:
    image = decode_bgr(data)
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_grey(data: bytes) -> np.ndarray | None:
    """HxW uint8 (channel 0 of multi-channel files, as the builder stores masks); None if undecodable."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.dtype != np.uint8:
        return None
    if array.ndim == 3:
        # OpenCV returns BGR(A); channel 0 of the file is the last colour channel here.
        array = np.ascontiguousarray(array[..., 2] if array.shape[-1] >= 3 else array[..., 0])
    return array
