"""The paper's per-example training transform (docs/design.md section 5), uint8 on the host.

From a raw record (encoded bytes, see `raw_records.RawSource`) to maps at the training size S:

1. decode the alpha PNG (full size) and draw the trimap kernel k in `trimap_kernel_range` (inclusive);
2. draw the crop side from `crop_sizes` (the smallest one when the draw is not smaller than the image's
   short side); the crop is clamped to the image (never larger than it);
3. with probability `transition_crop_prob` centre the crop on a transition pixel (the trimap's unknown
   band for kernel k, located on a stride-s subsample of the alpha, s = short side // 256, then
   jittered inside the s x s cell), else on any pixel; clamp the crop inside the image;
4. trimap = elliptical dilate(alpha > 0) / erode(alpha == 255) with kernel k (OpenCV's, computed bit
   for bit on packed rows by `morphology`) on the crop plus a margin of k pixels: identical to the
   full-resolution trimap inside the crop (OpenCV treats the image border the same way in both cases)
   at a fraction of the cost;
5. horizontal flip with probability `flip_prob`;
6. every map is sampled once, bilinearly (OpenCV INTER_LINEAR, half-pixel centres), from the crop to
   S x S: `cv2.resize` of the crop then a flip; the JPEG image (and JPEG fg/bg) is decoded at 1/2, 1/4
   or 1/8 DCT scale when the crop shrinks at least that much (`reduced_dct_decode`), the crop origin
   being rounded down to a multiple of that factor (`align_crop`) so that all maps stay aligned;
7. trimap re-quantised after resizing: > 180 -> 255, < 50 -> 0, else 128.

fg/bg are decoded only when the example has them and `use_fg_bg`; the facemask only when the example
has one and `use_facemask`. Everything stays uint8.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import cv2
import grain
import numpy as np

from p3m_jax.common.errors import check
from p3m_jax.data import morphology
from p3m_jax.data import decoding
from p3m_jax.data.raw_records import BadExampleError

_log = logging.getLogger(__name__)

# Keys of one training element (and of a host batch, with a leading batch axis).
ELEMENT_KEYS = ("image", "alpha", "trimap", "fg", "bg", "has_fg_bg", "facemask", "has_facemask")


def element_spec(size: int, *, icp: bool = False, fcp: bool = False) -> dict[str, tuple[tuple, str]]:
    """Shape and dtype of each array of one training element at crop ``size`` (a batch adds a leading
    axis): what the input pipeline yields, with P3M-CP's ICP flag and FCP inputs when they are on."""
    image, single = ((size, size, 3), "uint8"), ((size, size, 1), "uint8")
    spec = {
        "image": image,
        "alpha": single,
        "trimap": single,
        "fg": image,
        "bg": image,
        "has_fg_bg": ((), "bool"),
        "facemask": single,
        "has_facemask": ((), "bool"),
    }
    if icp:
        spec["icp_pasted"] = ((), "bool")
    if fcp:
        spec.update(fcp_source=image, fcp_mask=single, fcp_apply=((), "bool"))
    return spec


BAD = "_bad"  # key of the marker element that replaces a skipped bad example
_TRANSITION_GRID = 256  # transition pixels are searched on a grid with about this short side


@dataclasses.dataclass(frozen=True)
class Crop:
    """A crop window in full-resolution pixels, and whether its centre was drawn on the transition band."""

    y0: int
    x0: int
    height: int
    width: int
    kernel: int
    on_transition: bool
    centre: tuple[int, int]


def elliptical_trimap(alpha: np.ndarray, kernel: int) -> np.ndarray:
    """uint8 0/128/255: 255 where erode(alpha == 255), 0 outside dilate(alpha > 0), else 128.

    Erode/dilate are OpenCV's with a k x k `MORPH_ELLIPSE` element, computed bit for bit by
    `morphology.dilate_and_erode` (4-5x faster than `cv2.dilate` at k = 30)."""
    reach, solid = morphology.dilate_and_erode((alpha > 0).view(np.uint8), (alpha == 255).view(np.uint8), kernel)
    trimap = reach * np.uint8(128)
    trimap[solid.view(bool)] = 255
    return trimap


def quantise_trimap(trimap: np.ndarray) -> np.ndarray:
    """The paper's re-quantisation after resizing: > 180 -> 255, < 50 -> 0, else 128."""
    out = np.full(trimap.shape, 128, np.uint8)
    out[trimap > 180] = 255
    out[trimap < 50] = 0
    return out


def transition_grid(alpha: np.ndarray, kernel: int) -> tuple[np.ndarray, int]:
    """(unknown-band mask on a stride-s subsample of `alpha`, s); s = 1 for images up to 511 px."""
    stride = max(1, min(alpha.shape) // _TRANSITION_GRID)
    small = alpha[::stride, ::stride] if stride > 1 else alpha
    return elliptical_trimap(small, max(1, int(round(kernel / stride)))) == 128, stride


def sample_crop(
    alpha: np.ndarray, rng: np.random.Generator, *, crop_sizes, kernel_range, transition_crop_prob: float
) -> Crop:
    """Draws the trimap kernel and the crop window (steps 1-3 of the module docstring)."""
    height, width = alpha.shape
    kernel = int(rng.integers(int(kernel_range[0]), int(kernel_range[1]) + 1))
    side = int(crop_sizes[int(rng.integers(len(crop_sizes)))])
    if side >= min(height, width):
        side = int(min(crop_sizes))
    crop_h, crop_w = min(side, height), min(side, width)
    on_transition = False
    if rng.random() < transition_crop_prob:
        band, stride = transition_grid(alpha, kernel)
        ys, xs = np.nonzero(band)
        if len(ys):
            pick = int(rng.integers(len(ys)))
            cy = min(height - 1, int(ys[pick]) * stride + int(rng.integers(stride)))
            cx = min(width - 1, int(xs[pick]) * stride + int(rng.integers(stride)))
            on_transition = True
    if not on_transition:
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y0 = int(np.clip(cy - crop_h // 2, 0, height - crop_h))
    x0 = int(np.clip(cx - crop_w // 2, 0, width - crop_w))
    return Crop(y0, x0, crop_h, crop_w, kernel, on_transition, (cy, cx))


def reduce_factor(crop: Crop, size: int) -> int:
    """The largest JPEG DCT reduction (1, 2, 4, 8) that still leaves >= `size` pixels across the crop."""
    for factor in (8, 4, 2):
        if min(crop.height, crop.width) >= factor * size:
            return factor
    return 1


def align_crop(crop: Crop, size: int) -> Crop:
    """Moves the crop origin down to a multiple of `reduce_factor(crop, size)` (by < 8 pixels), so that a
    reduced-DCT decode samples the crop on whole reduced pixels and `cv2.resize` can do it (see
    `warp_crop`). Done whatever `reduced_dct_decode` says, so the switch changes only the image decode."""
    factor = reduce_factor(crop, size)
    if factor == 1:
        return crop
    return dataclasses.replace(crop, y0=crop.y0 - crop.y0 % factor, x0=crop.x0 - crop.x0 % factor)


def warp_crop(array: np.ndarray, crop: Crop, size: int, flip: bool, *, origin=(0, 0), reduce: int = 1) -> np.ndarray:
    """Samples `crop` (full-resolution coordinates) of `array` to size x size, flipped if `flip`.

    `array` covers the full-resolution region starting at `origin` (y, x), at 1/`reduce` scale (JPEG DCT
    scaling: reduced pixel i covers full pixels [i r, (i + 1) r)). Output pixel u samples full-resolution
    x = x0 + (u + 0.5) * crop_w / size - 0.5, the same as `cv2.resize` of the crop. When the crop falls on
    whole pixels of `array` (always at full scale; at reduced scale once `align_crop` has run) it is
    exactly `cv2.resize` of the slice, then a flip, 3-30x faster than the general `cv2.warpAffine`.
    """
    oy, ox = crop.y0 - origin[0], crop.x0 - origin[1]
    if not (oy % reduce or ox % reduce or crop.height % reduce or crop.width % reduce):
        window = array[oy // reduce : (oy + crop.height) // reduce, ox // reduce : (ox + crop.width) // reduce]
        out = cv2.resize(window, (size, size), interpolation=cv2.INTER_LINEAR)
        return cv2.flip(out, 1) if flip else out
    sx, sy = crop.width / size, crop.height / size
    r = float(reduce)
    shift = (r - 1.0) / 2.0
    if flip:
        ax, bx = -sx / r, (ox - shift - 0.5 + (size - 0.5) * sx) / r
    else:
        ax, bx = sx / r, (ox - shift - 0.5 + 0.5 * sx) / r
    ay, by = sy / r, (oy - shift - 0.5 + 0.5 * sy) / r
    matrix = np.array([[ax, 0.0, bx], [0.0, ay, by]], np.float64)
    return cv2.warpAffine(
        array, matrix, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE
    )


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
    """Raw record -> training element at `image_size` (see the module docstring).

    The element: image (S, S, 3), alpha/trimap/facemask (S, S, 1), fg/bg (S, S, 3) uint8 (zeros where
    absent), has_fg_bg/has_facemask bool. A bad record raises `BadExampleError`, or with
    `skip_bad_examples` becomes `{'_bad': name, 'index': i, 'reason': ...}`, dropped (and counted)
    before batching.
    """

    image_size: int
    crop_sizes: tuple[int, ...]
    trimap_kernel_range: tuple[int, int]
    transition_crop_prob: float
    flip_prob: float
    use_fg_bg: bool
    use_facemask: bool
    reduced_dct_decode: bool
    skip_bad_examples: bool

    def __post_init__(self):
        check(self.image_size >= 1, "data.image_size", f"must be >= 1, got {self.image_size}")
        check(
            len(self.crop_sizes) > 0 and min(self.crop_sizes) >= 1,
            "data.crop_sizes",
            f"needs at least one positive size, got {self.crop_sizes}",
        )
        low, high = self.trimap_kernel_range
        check(1 <= low <= high, "data.trimap_kernel_range", f"needs 1 <= low <= high, got {self.trimap_kernel_range}")
        for field in ("transition_crop_prob", "flip_prob"):
            value = getattr(self, field)
            check(0.0 <= value <= 1.0, f"data.{field}", f"must be a probability in [0, 1], got {value}")

    @classmethod
    def from_config(cls, data_config) -> "TrainTransform":
        """From the `config.data` group (fields of the same names)."""
        return cls(
            image_size=int(data_config.image_size),
            crop_sizes=tuple(int(c) for c in data_config.crop_sizes),
            trimap_kernel_range=tuple(int(k) for k in data_config.trimap_kernel_range),
            transition_crop_prob=float(data_config.transition_crop_prob),
            flip_prob=float(data_config.flip_prob),
            use_fg_bg=bool(data_config.use_fg_bg),
            use_facemask=bool(data_config.use_facemask),
            reduced_dct_decode=bool(data_config.reduced_dct_decode),
            skip_bad_examples=bool(data_config.skip_bad_examples),
        )

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        try:
            return self.apply(element, rng)
        except BadExampleError as e:
            if not self.skip_bad_examples:
                raise
            _log.warning("skipping %s", e)
            return {BAD: e.name, "index": e.index, "reason": e.reason}

    def apply(self, raw: dict[str, Any], rng: np.random.Generator):
        """The transform itself."""
        name, index = raw.get("name", ""), int(raw.get("index", -1))
        if "error" in raw:
            raise BadExampleError(name, index, raw["error"])
        size = self.image_size

        def bad(reason: str):
            return BadExampleError(name, index, reason)

        alpha = decoding.decode_grey(raw["alpha"])
        if alpha is None:
            raise bad("alpha does not decode as an 8-bit image")
        height, width = alpha.shape

        crop = sample_crop(
            alpha,
            rng,
            crop_sizes=self.crop_sizes,
            kernel_range=self.trimap_kernel_range,
            transition_crop_prob=self.transition_crop_prob,
        )
        crop = align_crop(crop, size)
        flip = bool(rng.random() < self.flip_prob)

        def decode_colour(key: str) -> tuple[np.ndarray, int]:
            data = raw[key]
            reduce = reduce_factor(crop, size) if self.reduced_dct_decode and decoding.is_jpeg(data) else 1
            if decoding.is_jpeg(data):
                stored = decoding.jpeg_size(data)
                if stored is not None and stored != (height, width):
                    raise bad(f"{key} is {stored[0]}x{stored[1]} but alpha is {height}x{width}")
            array = decoding.decode_bgr(data, reduce)
            if array is None:
                raise bad(f"{key} does not decode")
            expected = (-(-height // reduce), -(-width // reduce))
            if array.shape[:2] != expected:
                raise bad(
                    f"{key} is {array.shape[0]}x{array.shape[1]} (at 1/{reduce} scale) but alpha is {height}x{width}"
                )
            return array, reduce

        def warp_colour(array: np.ndarray, reduce: int) -> np.ndarray:
            return warp_crop(array, crop, size, flip, reduce=reduce)[..., ::-1]  # BGR -> RGB

        image, reduce = decode_colour("image")
        out = {"image": np.ascontiguousarray(warp_colour(image, reduce))}
        out["alpha"] = warp_crop(alpha, crop, size, flip)[..., None]

        margin = crop.kernel
        wy0, wx0 = max(0, crop.y0 - margin), max(0, crop.x0 - margin)
        wy1, wx1 = min(height, crop.y0 + crop.height + margin), min(width, crop.x0 + crop.width + margin)
        trimap = elliptical_trimap(alpha[wy0:wy1, wx0:wx1], crop.kernel)
        trimap = warp_crop(trimap, crop, size, flip, origin=(wy0, wx0))
        out["trimap"] = quantise_trimap(trimap)[..., None]

        has_fg_bg = bool(raw.get("has_fg_bg", False)) and self.use_fg_bg
        if has_fg_bg:
            for key in ("fg", "bg"):
                array, key_reduce = decode_colour(key)
                out[key] = np.ascontiguousarray(warp_colour(array, key_reduce))
        else:
            out["fg"] = np.zeros((size, size, 3), np.uint8)
            out["bg"] = np.zeros((size, size, 3), np.uint8)
        out["has_fg_bg"] = np.bool_(has_fg_bg)

        has_facemask = bool(raw.get("has_facemask", False)) and self.use_facemask
        if has_facemask:
            facemask = decoding.decode_grey(raw["facemask"])
            if facemask is None:
                raise bad("facemask does not decode as an 8-bit image")
            if facemask.shape != alpha.shape:
                raise bad(f"facemask is {facemask.shape[0]}x{facemask.shape[1]} but alpha is {height}x{width}")
            out["facemask"] = warp_crop(facemask, crop, size, flip)[..., None]
        else:
            out["facemask"] = np.zeros((size, size, 1), np.uint8)
        out["has_facemask"] = np.bool_(has_facemask)
        return out


@dataclasses.dataclass(frozen=True)
class PassBadThrough(grain.transforms.RandomMap):
    """Applies `transform` (a RandomMap) to good elements; bad-example markers pass unchanged."""

    transform: Any

    def random_map(self, element, rng):
        if BAD in element:
            return element
        return self.transform.random_map(element, rng)
