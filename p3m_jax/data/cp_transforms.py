"""P3M-CP in the input pipeline: image-level copy and paste (ICP) and the inputs of the
feature-level one (FCP).

Both paste a normal face from a face source (`p3m_jax.data.faces`) onto the blurred face of a
training example, with one geometry (`place_face`):

1. the source face is cut out by its mask (bounding box of ``mask >= 128``);
2. it is scaled so that its bounding box matches the target facemask's bounding box (each side
   independently, "resize to fill"; ``keep_aspect=True`` scales both sides by the geometric
   mean instead), then by a random factor in ``scale_range``, flipped horizontally with
   probability ``flip_prob`` and rotated by a uniform angle in [-rotation_deg, rotation_deg];
3. it is placed with its bounding-box centre on the target facemask's bounding-box centre;
4. the paste weight is the warped (bilinear, so soft-edged) source mask AND the binary target
   facemask (``facemask >= 128``): nothing outside the target facemask ever changes.

ICP keeps the example consistent, the pasted face being foreground. With paste weight w,
old alpha a (both in [0, 1]) and the pasted colour F:
  image' = w F + (1 - w) image          (exactly what an over-composite of the face does)
  alpha' = w + (1 - w) a                (= 1 - (1 - w)(1 - a): the face is opaque foreground)
  fg'    = (w F + (1 - w) a fg) / alpha' (so alpha' fg' + (1 - alpha') bg == image' when the
                                          old maps composed exactly; only if has_fg_bg)
  bg'    = bg
  trimap' : unchanged where w == 0; where w > 0, 128 stays 128 (unknown may hold any alpha),
            255 stays 255 (alpha was and stays 1), 0 becomes 255 where alpha' == 255 and 128
            otherwise. So "trimap 255 => alpha 255" and "trimap 0 => alpha 0" still hold.
Pixels with w == 0 are copied bit-exactly. ``facemask`` and ``has_facemask`` are kept (the face
is still where the mask says). Examples without a facemask (``has_facemask`` false, or an empty
mask after cropping) pass unchanged and count as not pasted.

FCP needs, per example, the aligned source face to run through the network: `aligned_source`
returns the example's image with the face pasted (the same geometry, so the face sits exactly
on the target face and the surrounding context matches the target) and the mask of the
positions whose features get replaced (paste weight >= 0.5).

The grain transforms `ImageCopyPaste` and `FeatureCopyPasteInputs` are module-level classes
holding only the face source and numbers, so they pickle into grain's worker processes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import cv2
import grain
import numpy as np

from p3m_jax.common.errors import check
from p3m_jax.data.faces import open_face_source

# Binary threshold of uint8 masks (facemask, face-source mask).
_MASK_THRESHOLD = 128


def _mask2d(mask: np.ndarray) -> np.ndarray:
    return mask[..., 0] if mask.ndim == 3 else mask


def _bbox(binary: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) inclusive bounding box of the True pixels, or None."""
    rows = np.flatnonzero(binary.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(binary.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def place_face(
    target_facemask: np.ndarray,
    face_image: np.ndarray,
    face_mask: np.ndarray,
    rng: np.random.Generator,
    *,
    rotation_deg: float,
    scale_range: Sequence[float],
    flip_prob: float,
    keep_aspect: bool,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Warps a source face onto the target facemask (the shared ICP/FCP geometry).

    Args:
      target_facemask: (S, S) or (S, S, 1) uint8 facemask of the target example.
      face_image: (h, w, 3) uint8 RGB source face.
      face_mask: (h, w) or (h, w, 1) uint8 source face mask.
      rng: draws scale, flip and rotation.
      rotation_deg, scale_range, flip_prob, keep_aspect: augmentation; see the module docstring.

    Returns:
      ``(face, weight)``: the warped face colours (S, S, 3) float32 and the paste weight (S, S)
      float32 in [0, 1], zero outside the target facemask; or None when the target has no
      facemask pixel, the source mask is empty, or nothing lands inside the facemask.
    """
    target = _mask2d(target_facemask) >= _MASK_THRESHOLD
    tbox = _bbox(target)
    src = _mask2d(face_mask) >= _MASK_THRESHOLD
    sbox = _bbox(src)
    if tbox is None or sbox is None:
        return None
    ty0, ty1, tx0, tx1 = tbox
    sy0, sy1, sx0, sx1 = sbox
    crop = face_image[sy0 : sy1 + 1, sx0 : sx1 + 1].astype(np.float32)
    crop_mask = src[sy0 : sy1 + 1, sx0 : sx1 + 1].astype(np.float32)
    # Scale to the target box, then the random scale; resampled before the rotation so that a
    # large source (512 px CelebA faces on a 40 px face region) is area-averaged, not aliased.
    fy, fx = (ty1 - ty0 + 1) / crop.shape[0], (tx1 - tx0 + 1) / crop.shape[1]
    if keep_aspect:
        fy = fx = float(np.sqrt(fy * fx))
    factor = rng.uniform(*scale_range)
    new_w = max(1, int(round(crop.shape[1] * fx * factor)))
    new_h = max(1, int(round(crop.shape[0] * fy * factor)))
    shrink = new_w * new_h < crop.shape[0] * crop.shape[1]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    crop = cv2.resize(crop, (new_w, new_h), interpolation=interp).reshape(new_h, new_w, 3)
    crop_mask = cv2.resize(crop_mask, (new_w, new_h), interpolation=interp).reshape(new_h, new_w)
    if rng.random() < flip_prob:
        crop, crop_mask = crop[:, ::-1], crop_mask[:, ::-1]
    angle = rng.uniform(-rotation_deg, rotation_deg)
    # Rotate about the crop's centre, then move that centre onto the target box's centre
    # (pixel centres at integer coordinates, as cv2.warpAffine samples).
    src_centre = ((new_w - 1) / 2.0, (new_h - 1) / 2.0)
    matrix = cv2.getRotationMatrix2D(src_centre, angle, 1.0)
    matrix[0, 2] += (tx0 + tx1) / 2.0 - src_centre[0]
    matrix[1, 2] += (ty0 + ty1) / 2.0 - src_centre[1]
    size = (target.shape[1], target.shape[0])
    face = cv2.warpAffine(
        np.ascontiguousarray(crop), matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    warped = cv2.warpAffine(
        np.ascontiguousarray(crop_mask),
        matrix,
        size,
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    weight = np.clip(warped, 0.0, 1.0) * target
    if not (weight > 0).any():
        return None
    return face.reshape(size[1], size[0], 3).astype(np.float32), weight.astype(np.float32)


def _round_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def paste_face(
    example: dict[str, Any],
    face_image: np.ndarray,
    face_mask: np.ndarray,
    rng: np.random.Generator,
    *,
    rotation_deg: float,
    scale_range: Sequence[float],
    flip_prob: float,
    keep_aspect: bool,
) -> tuple[dict[str, Any], bool]:
    """ICP on one training example (image, alpha, trimap, fg, bg, has_fg_bg, facemask,
    has_facemask; other keys are passed through).

    Returns ``(example', pasted)``: a new dict with the face pasted as described in the module
    docstring, or the input dict itself and False when the example has no facemask.
    """
    if not bool(example.get("has_facemask", False)):
        return example, False
    placed = place_face(
        example["facemask"],
        face_image,
        face_mask,
        rng,
        rotation_deg=rotation_deg,
        scale_range=scale_range,
        flip_prob=flip_prob,
        keep_aspect=keep_aspect,
    )
    if placed is None:
        return example, False
    face, weight = placed
    w = weight[..., None]
    inside = w > 0
    out = dict(example)
    image = example["image"].astype(np.float32)
    out["image"] = np.where(inside, _round_u8(w * face + (1 - w) * image), example["image"])
    alpha = example["alpha"].astype(np.float32) / 255.0
    new_alpha = w + (1 - w) * alpha
    out["alpha"] = np.where(inside, _round_u8(new_alpha * 255.0), example["alpha"])
    if bool(example.get("has_fg_bg", False)):
        fg = example["fg"].astype(np.float32)
        new_fg = (w * face + (1 - w) * alpha * fg) / np.maximum(new_alpha, 1e-6)
        out["fg"] = np.where(inside, _round_u8(new_fg), example["fg"])
    trimap = example["trimap"]
    promoted = np.where(out["alpha"] == 255, 255, 128).astype(trimap.dtype)
    out["trimap"] = np.where(inside & (trimap == 0), promoted, trimap)
    return out, True


def aligned_source(
    example: dict[str, Any],
    face_image: np.ndarray,
    face_mask: np.ndarray,
    rng: np.random.Generator,
    *,
    rotation_deg: float,
    scale_range: Sequence[float],
    flip_prob: float,
    keep_aspect: bool,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The FCP source for one example, with `place_face`'s geometry.

    Returns ``(fcp_source, fcp_mask)``: (S, S, 3) uint8, the example's image with the aligned
    face pasted over its facemask, and (S, S, 1) uint8 0/255, the positions whose features are
    replaced (paste weight >= 0.5, a subset of the target facemask); or None when the example
    has no facemask.
    """
    if not bool(example.get("has_facemask", False)):
        return None
    placed = place_face(
        example["facemask"],
        face_image,
        face_mask,
        rng,
        rotation_deg=rotation_deg,
        scale_range=scale_range,
        flip_prob=flip_prob,
        keep_aspect=keep_aspect,
    )
    if placed is None:
        return None
    face, weight = placed
    w = weight[..., None]
    image = example["image"]
    source = np.where(w > 0, _round_u8(w * face + (1 - w) * image.astype(np.float32)), image)
    mask = np.where(w >= 0.5, 255, 0).astype(np.uint8)
    return source, mask


@dataclasses.dataclass(frozen=True)
class CopyPasteOptions:
    """The per-example numbers of one P3M-CP level (``config.copy_paste.icp`` or ``.fcp``)."""

    level: str  # "icp" | "fcp": names the config fields in errors
    prob: float
    rotation_deg: float
    scale_range: tuple[float, float]
    flip_prob: float
    keep_aspect: bool

    def __post_init__(self):
        field = f"copy_paste.{self.level}"
        check(0.0 <= self.prob <= 1.0, f"{field}.prob", f"must be a probability in [0, 1], got {self.prob}")
        check(
            0.0 <= self.flip_prob <= 1.0, f"{field}.flip_prob", f"must be a probability in [0, 1], got {self.flip_prob}"
        )
        check(self.rotation_deg >= 0, f"{field}.rotation_deg", f"must be >= 0, got {self.rotation_deg}")
        check(
            len(self.scale_range) == 2 and 0 < self.scale_range[0] <= self.scale_range[1],
            f"{field}.scale_range",
            f"needs 0 < low <= high, got {self.scale_range}",
        )

    @classmethod
    def from_config(cls, level: str, level_config) -> "CopyPasteOptions":
        return cls(
            level=level,
            prob=float(level_config.prob),
            rotation_deg=float(level_config.rotation_deg),
            scale_range=tuple(float(s) for s in level_config.scale_range),
            flip_prob=float(level_config.flip_prob),
            keep_aspect=bool(level_config.keep_aspect),
        )

    def augment(self) -> dict[str, Any]:
        """The keyword arguments of `place_face`."""
        return dict(
            rotation_deg=self.rotation_deg,
            scale_range=self.scale_range,
            flip_prob=self.flip_prob,
            keep_aspect=self.keep_aspect,
        )


class _CopyPasteBase(grain.transforms.RandomMap):
    def __init__(self, face_source, options: CopyPasteOptions):
        if len(face_source) == 0:
            raise ValueError("copy-paste face source is empty")
        self.face_source = face_source
        self.options = options
        self.augment = options.augment()  # the keyword arguments of place_face, built once

    def _draw_face(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return self.face_source[int(rng.integers(len(self.face_source)))]


class ImageCopyPaste(_CopyPasteBase):
    """Grain transform: ICP with probability ``prob`` per example; adds ``icp_pasted`` (bool,
    true only where a face was actually pasted)."""

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        pasted = False
        if rng.random() < self.options.prob and bool(element.get("has_facemask", False)):
            face = self._draw_face(rng)
            element, pasted = paste_face(element, face["image"], face["mask"], rng, **self.augment)
        element = dict(element)
        element["icp_pasted"] = np.bool_(pasted)
        return element


class FeatureCopyPasteInputs(_CopyPasteBase):
    """Grain transform: adds the FCP inputs ``fcp_source`` (S, S, 3) uint8, ``fcp_mask``
    (S, S, 1) uint8 and ``fcp_apply`` (bool, drawn with probability ``prob``; false when the
    example has no facemask). Where ``fcp_apply`` is false the source is the example's own image
    and the mask is empty, so every batch has the same keys and shapes."""

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        element = dict(element)
        result = None
        if rng.random() < self.options.prob and bool(element.get("has_facemask", False)):
            face = self._draw_face(rng)
            result = aligned_source(element, face["image"], face["mask"], rng, **self.augment)
        if result is None or not result[1].any():
            image = element["image"]
            element["fcp_source"] = image.copy()
            element["fcp_mask"] = np.zeros(image.shape[:2] + (1,), np.uint8)
            element["fcp_apply"] = np.bool_(False)
        else:
            element["fcp_source"], element["fcp_mask"] = result
            element["fcp_apply"] = np.bool_(True)
        return element


def make_copy_paste_transforms(copy_paste_config, seed: int = 0) -> list:
    """The grain transforms ``config.copy_paste`` asks for (ICP first, then the FCP inputs),
    for ``create_train_iterator(..., extra_transforms=...)``; an empty list when both are off.
    Both share one face source when their source settings agree."""
    transforms = []
    sources: dict[tuple, Any] = {}
    for key, cls in (("icp", ImageCopyPaste), ("fcp", FeatureCopyPasteInputs)):
        cfg = copy_paste_config[key]
        if not cfg.enabled:
            continue
        options = CopyPasteOptions.from_config(key, cfg)  # checked before the face source is opened
        source_key = (cfg.face_source, cfg.face_source_format, cfg.num_synthetic_faces, cfg.synthetic_face_size)
        if source_key not in sources:
            sources[source_key] = open_face_source(
                cfg.face_source,
                cfg.face_source_format,
                num_synthetic_faces=cfg.num_synthetic_faces,
                synthetic_face_size=cfg.synthetic_face_size,
                seed=seed,
            )
        transforms.append(cls(sources[source_key], options))
    return transforms


__all__ = [
    "place_face",
    "paste_face",
    "aligned_source",
    "CopyPasteOptions",
    "ImageCopyPaste",
    "FeatureCopyPasteInputs",
    "make_copy_paste_transforms",
]
