"""Sources of normal (unblurred) faces with face masks, for P3M-CP.

A face source is a random-access sequence (``len`` / ``[i]``) whose items are dicts
``{"image": (h, w, 3) uint8 RGB, "mask": (h, w) uint8 0/255}``; the mask marks the face region
(skin, eyes, brows, nose, mouth, lips, ears). Grain can wrap one directly
(``grain.MapDataset.source(face_source)``), and the copy-and-paste transforms in
`p3m_jax.data.cp_transforms` index one with their per-example random generator.

Three sources:

* `CelebAMaskHQFaces`: CelebAMask-HQ as distributed, ``CelebA-HQ-img/<id>.jpg`` (1024 x 1024) and
  ``CelebAMask-HQ-mask-anno/<k>/<id:05d>_<part>.png`` (512 x 512, one binary mask per part, folder
  ``k = id // 2000``). The face mask is the union of `CELEBAMASK_FACE_PARTS` (hair, neck, hat,
  cloth and earrings are left out: P3M-10k's blurred region is the face itself).
* `PairedFaces`: a plain ``images/`` + ``masks/`` pair of folders matched by file stem.
* `SyntheticFaces`: procedural normal faces (no download), for the quickstart and tests.

Why a plain random-access source and not a TFDS builder of its own: the faces are only ever
read by index during training, a face set is a few thousand small files that need no
re-encoding or sharding, and the source object is picklable (only paths), so grain's spawned
worker processes can carry it. A TFDS build would copy the whole CelebAMask-HQ (~3 GB of
masks) for no gain. The files are checked once at construction: missing or unpaired files raise
`FaceSourceError` naming them. Images are decoded lazily with OpenCV on access.
"""

from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np

# CelebAMask-HQ part names (the dataset's own spelling) whose union is the face region.
CELEBAMASK_FACE_PARTS = (
    "skin",
    "nose",
    "eye_g",
    "l_eye",
    "r_eye",
    "l_brow",
    "r_brow",
    "l_ear",
    "r_ear",
    "mouth",
    "u_lip",
    "l_lip",
)
CELEBAMASK_IMAGE_DIR = "CelebA-HQ-img"
CELEBAMASK_MASK_DIR = "CelebAMask-HQ-mask-anno"
# CelebAMask-HQ keeps 2000 ids per numbered annotation folder.
_CELEBAMASK_IDS_PER_FOLDER = 2000

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
# How many offending names an error message lists before abbreviating.
_MAX_LISTED = 20


class FaceSourceError(ValueError):
    """A face folder is missing, empty, or has unpaired or unreadable files (all named)."""


def _listing(names: Sequence[str], what: str) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"{len(names)} {what}: {shown}{more}"


def _files_by_stem(folder: str, extensions: Sequence[str]) -> dict[str, str]:
    if not os.path.isdir(folder):
        raise FaceSourceError(f"face folder not found: {folder}")
    out: dict[str, str] = {}
    duplicates = []
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        if name.startswith(".") or ext.lower() not in extensions:
            continue
        if stem in out:
            duplicates.append(name)
        out[stem] = os.path.join(folder, name)
    if duplicates:
        raise FaceSourceError(f"{folder}: several files share a stem ({_listing(duplicates, 'files')})")
    return out


def decode_image(path: str, reduce: int = 1) -> np.ndarray:
    """RGB uint8 (h, w, 3) of ``path``, decoded at 1/``reduce`` scale (1, 2, 4 or 8)."""
    flags = {
        1: cv2.IMREAD_COLOR,
        2: cv2.IMREAD_REDUCED_COLOR_2,
        4: cv2.IMREAD_REDUCED_COLOR_4,
        8: cv2.IMREAD_REDUCED_COLOR_8,
    }[reduce]
    image = cv2.imread(path, flags)
    if image is None:
        raise FaceSourceError(f"cannot decode face image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_mask(path: str) -> np.ndarray:
    """(h, w) uint8 mask of ``path`` (channel 0 of colour files), binarised to 0/255."""
    mask = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise FaceSourceError(f"cannot decode face mask {path}")
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.dtype != np.uint8:
        mask = (mask > 0).astype(np.uint8) * 255
    return np.where(mask >= 128, 255, 0).astype(np.uint8)


def _fit_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resizes a 0/255 mask to ``shape`` (h, w) with nearest neighbour (CelebAMask-HQ masks are
    512 x 512 against 1024 x 1024 images)."""
    if mask.shape[:2] == shape:
        return mask
    return cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)


class CelebAMaskHQFaces:
    """CelebAMask-HQ faces with the union of the face parts' masks.

    Args:
      root: the folder holding ``CelebA-HQ-img/`` and ``CelebAMask-HQ-mask-anno/``.
      parts: part names whose union is the face mask.
      reduce: decode the 1024 x 1024 JPEGs at 1/reduce scale (2 gives the masks' 512 x 512); the
        face is rescaled to the target's face region anyway.
      limit: keep only the first ``limit`` ids (0: all), e.g. for quick runs.

    Raises:
      FaceSourceError: a folder is missing or empty, an image has no face-part mask, or a part
        mask has no image (each listed by name).
    """

    def __init__(self, root: str, parts: Sequence[str] = CELEBAMASK_FACE_PARTS, reduce: int = 2, limit: int = 0):
        self.root = os.fspath(root)
        self.parts = tuple(parts)
        self.reduce = int(reduce)
        images = _files_by_stem(os.path.join(self.root, CELEBAMASK_IMAGE_DIR), IMAGE_EXTENSIONS)
        mask_root = os.path.join(self.root, CELEBAMASK_MASK_DIR)
        if not os.path.isdir(mask_root):
            raise FaceSourceError(f"face mask folder not found: {mask_root}")
        masks: dict[int, list[str]] = {}
        strays = []
        for sub in sorted(os.listdir(mask_root)):
            folder = os.path.join(mask_root, sub)
            if not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                stem, ext = os.path.splitext(name)
                if name.startswith(".") or ext.lower() not in MASK_EXTENSIONS:
                    continue
                number, _, part = stem.partition("_")
                if not number.isdigit() or not part:
                    strays.append(os.path.join(sub, name))
                    continue
                if part in self.parts:
                    masks.setdefault(int(number), []).append(os.path.join(folder, name))
        image_ids = {}
        for stem, path in images.items():
            if not stem.isdigit():
                strays.append(os.path.join(CELEBAMASK_IMAGE_DIR, os.path.basename(path)))
                continue
            image_ids[int(stem)] = path
        problems = []
        if strays:
            problems.append(
                "names not in CelebAMask-HQ's form (<id>.jpg, <id:05d>_<part>.png): " + _listing(strays, "files")
            )
        no_mask = [os.path.basename(image_ids[i]) for i in image_ids if i not in masks]
        if no_mask:
            problems.append(
                f"images without any face-part mask ({', '.join(self.parts)}): " + _listing(no_mask, "images")
            )
        no_image = [os.path.basename(p) for i, paths in masks.items() if i not in image_ids for p in paths]
        if no_image:
            problems.append(f"masks without an image in {CELEBAMASK_IMAGE_DIR}/: " + _listing(no_image, "masks"))
        if problems:
            raise FaceSourceError(f"CelebAMask-HQ folder {self.root}: " + "; ".join(problems))
        ids = sorted(image_ids)
        if limit:
            ids = ids[:limit]
        if not ids:
            raise FaceSourceError(f"CelebAMask-HQ folder {self.root}: no face images")
        self._images = [image_ids[i] for i in ids]
        self._masks = [sorted(masks[i]) for i in ids]

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        image = decode_image(self._images[index], self.reduce)
        mask = np.zeros(image.shape[:2], np.uint8)
        for path in self._masks[index]:
            mask = np.maximum(mask, _fit_mask(decode_mask(path), image.shape[:2]))
        return {"image": image, "mask": mask}


class PairedFaces:
    """Faces from ``<root>/images/<stem>.<ext>`` with masks ``<root>/masks/<stem>.<ext>``.

    Masks are binarised at 128 and resized (nearest) to their image when the sizes differ.

    Raises:
      FaceSourceError: a folder is missing or empty, or a stem has an image but no mask or a
        mask but no image (all listed by name).
    """

    def __init__(self, root: str, images_dir: str = "images", masks_dir: str = "masks", reduce: int = 1):
        self.root = os.fspath(root)
        self.reduce = int(reduce)
        images = _files_by_stem(os.path.join(self.root, images_dir), IMAGE_EXTENSIONS)
        masks = _files_by_stem(os.path.join(self.root, masks_dir), MASK_EXTENSIONS)
        problems = []
        no_mask = [os.path.basename(images[s]) for s in images if s not in masks]
        if no_mask:
            problems.append(f"images without a mask in {masks_dir}/: " + _listing(no_mask, "images"))
        no_image = [os.path.basename(masks[s]) for s in masks if s not in images]
        if no_image:
            problems.append(f"masks without an image in {images_dir}/: " + _listing(no_image, "masks"))
        if problems:
            raise FaceSourceError(f"face folder {self.root}: " + "; ".join(problems))
        if not images:
            raise FaceSourceError(f"face folder {self.root}: no images in {images_dir}/")
        stems = sorted(images)
        self._images = [images[s] for s in stems]
        self._masks = [masks[s] for s in stems]

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        image = decode_image(self._images[index], self.reduce)
        mask = _fit_mask(decode_mask(self._masks[index]), image.shape[:2])
        return {"image": image, "mask": mask}


class SyntheticFaces:
    """``count`` procedural normal faces of ``size`` x ``size``, a pure function of (seed, index).

    Each face is a skin-toned ellipse with shading and fine skin noise, two eyes (white, iris,
    pupil), brows, a nose shadow and lips, sharp (not blurred), on a flat random background;
    the mask is the face ellipse. Cheap to draw (well under a millisecond at 64 x 64), so
    nothing is cached.
    """

    def __init__(self, count: int = 64, size: int = 64, seed: int = 0):
        if count < 1 or size < 16:
            raise ValueError(f"SyntheticFaces needs count >= 1 and size >= 16; got {count}, {size}")
        self.count, self.size, self.seed = int(count), int(size), int(seed)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.count:
            raise IndexError(f"face index {index} out of range [0, {self.count})")
        return render_face(np.random.default_rng([self.seed, index]), self.size)


def render_face(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """Draws one synthetic face; see `SyntheticFaces`."""
    s = size
    image = np.empty((s, s, 3), np.float32)
    image[:] = rng.uniform(40, 220, 3)
    cx, cy = s / 2 + rng.uniform(-0.03, 0.03) * s, s / 2 + rng.uniform(-0.03, 0.03) * s
    ax, ay = rng.uniform(0.28, 0.36) * s, rng.uniform(0.38, 0.45) * s
    mask = np.zeros((s, s), np.uint8)
    cv2.ellipse(mask, (round(cx), round(cy)), (round(ax), round(ay)), 0, 0, 360, 255, -1)
    skin = np.array([rng.uniform(150, 240), rng.uniform(100, 190), rng.uniform(80, 160)], np.float32)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    # Side lighting and per-pixel skin noise: high-frequency detail that a blurred face lacks.
    shade = 1.0 + 0.15 * (xx - cx) / ax * rng.choice([-1.0, 1.0])
    face = skin[None, None] * shade[..., None] + rng.normal(0, 6, (s, s, 1)).astype(np.float32)
    image = np.where(mask[..., None] > 0, face, image)
    ex, ey = 0.42 * ax, cy - 0.22 * ay
    eye_r = max(1, round(0.18 * ax))
    iris = tuple(float(v) for v in rng.uniform(20, 140, 3))
    for sign in (-1, 1):
        c = (round(cx + sign * ex), round(ey))
        cv2.ellipse(image, c, (eye_r, max(1, eye_r // 2)), 0, 0, 360, (245, 245, 245), -1)
        cv2.circle(image, c, max(1, eye_r // 2), iris, -1)
        cv2.circle(image, c, max(1, eye_r // 4), (10, 10, 10), -1)
        brow_y = round(ey - 0.16 * ay)
        cv2.line(
            image,
            (round(cx + sign * (ex - eye_r)), brow_y),
            (round(cx + sign * (ex + eye_r)), brow_y - 1),
            (60, 40, 30),
            max(1, s // 48),
        )
    cv2.line(
        image,
        (round(cx), round(cy - 0.05 * ay)),
        (round(cx + 0.05 * ax), round(cy + 0.15 * ay)),
        tuple(float(v) for v in 0.7 * skin),
        max(1, s // 64),
    )
    cv2.ellipse(
        image,
        (round(cx), round(cy + 0.42 * ay)),
        (round(0.35 * ax), max(1, round(0.08 * ay))),
        0,
        0,
        360,
        (170, 50, 60),
        -1,
    )
    return {"image": np.clip(np.round(image), 0, 255).astype(np.uint8), "mask": mask}


def open_face_source(
    face_source: str,
    face_source_format: str,
    *,
    num_synthetic_faces: int,
    synthetic_face_size: int,
    seed: int,
):
    """Builds a face source from config values.

    Args:
      face_source: ``"synthetic"`` or a folder path.
      face_source_format: for a folder, ``"celebamask_hq"`` or ``"pair"`` (images/ + masks/).
      num_synthetic_faces, synthetic_face_size, seed: for ``"synthetic"``.
    """
    if face_source == "synthetic":
        return SyntheticFaces(num_synthetic_faces, synthetic_face_size, seed)
    path = os.path.expanduser(face_source)
    if face_source_format == "celebamask_hq":
        return CelebAMaskHQFaces(path)
    if face_source_format == "pair":
        return PairedFaces(path)
    raise ValueError(f"unknown face_source_format {face_source_format!r}; expected 'celebamask_hq' or 'pair'")


__all__ = [
    "CelebAMaskHQFaces",
    "PairedFaces",
    "SyntheticFaces",
    "FaceSourceError",
    "open_face_source",
    "render_face",
    "CELEBAMASK_FACE_PARTS",
]
