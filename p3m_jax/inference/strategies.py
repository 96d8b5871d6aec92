"""The paper's test strategies (RESIZE, HYBRID) as functions of a predictor and one image.

Both follow the authors' public inference (docs/design.md section 6):

* sizes: a side s at ratio r becomes min(1600, int(s * r) - int(s * r) % 32) (at least 32 here, where the
  authors' code would fail on images under 64 px);
* resizing is scikit-image's `transform.resize` on floats in [0, 1] (bilinear, Gaussian anti-aliasing with
  sigma (factor - 1) / 2 when shrinking, 'reflect' padding, output clipped to the input range), reproduced
  call for call with scipy.ndimage in `resize_like_skimage` (no scikit-image at run time);
* RESIZE: one pass at half size, the `fusion` output resized back to the image size;
* HYBRID: the `global` output of the half-size pass as a trimap (argmax -> 0 / 128 / 255), resized back as an
  8-bit image; the `local` output of a full-size pass resized back; where the resized trimap is exactly 255 the
  alpha is 1, exactly 0 it is 0, elsewhere the local alpha.

`NetworkRunner` runs the predictor on one normalized image, either at the exact input shape (one XLA
compilation per distinct shape) or bucketed: padded (symmetric reflection) up to a multiple of `bucket` on each
side and cropped back, so that many image sizes share a few compilations. Bucketing changes the network's
view near the border (and whatever global context the model has), so bucketed predictions differ slightly from
exact ones; benchmarks/bench_eval_compile.py measures by how much.
"""

from __future__ import annotations

import collections
import inspect
from typing import Callable

import numpy as np
from scipy import ndimage

from p3m_jax.common.constants import IMAGENET_MEAN, IMAGENET_STD

MAX_SIDE = 1600  # the authors' MAX_SIZE_H / MAX_SIZE_W
MIN_SIDE = 32
GLOBAL_RATIO = 0.5  # HYBRID's global pass and RESIZE's single pass
LOCAL_RATIO = 1.0  # HYBRID's local pass
_MEAN = np.array(IMAGENET_MEAN, np.float32)
_STD = np.array(IMAGENET_STD, np.float32)
STRATEGIES = ("resize", "hybrid")
BUCKET = 128  # the network input bucket `evaluate` and `predict` pad to by default


def protocol_side(side: int, ratio: float) -> int:
    """The network input length for an image side at `ratio`, as the authors compute it."""
    scaled = int(side * ratio)
    return max(MIN_SIDE, min(MAX_SIDE, scaled - scaled % 32))


def protocol_size(height: int, width: int, ratio: float) -> tuple[int, int]:
    """(height, width) of the network input for an image of (height, width) at `ratio`."""
    return protocol_side(height, ratio), protocol_side(width, ratio)


def resize_like_skimage(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """`skimage.transform.resize(image, shape)` for a float image (H, W) or (H, W, C), same dtype.

    Same scipy.ndimage calls as scikit-image: Gaussian anti-aliasing (sigma = max(0, (in / out - 1) / 2) per
    axis, mode 'mirror') when any axis shrinks, then a bilinear `zoom` with grid_mode=True and mode 'mirror',
    then the result clipped to the input's value range.
    """
    image = np.asarray(image)
    if image.dtype.kind != "f":
        raise TypeError(f"resize_like_skimage expects a float image, got {image.dtype}")
    if image.dtype == np.float16:
        image = image.astype(np.float32)
    out_shape = tuple(int(s) for s in shape) + tuple(image.shape[2:])
    if any(s < 1 for s in out_shape):
        raise ValueError(f"cannot resize to {out_shape}")
    factors = np.divide(image.shape, out_shape)
    filtered = image
    if any(o < i for o, i in zip(out_shape, image.shape)):
        sigma = np.maximum(0, (factors - 1) / 2)
        # A sigma under 1/8 gives a one-tap kernel (radius int(4 sigma + 0.5) = 0), weight exactly 1: skip
        # that axis (HYBRID's full-size pass shrinks 1080 -> 1056, sigma 0.011: no filtering at all).
        sigma = np.where((4.0 * sigma + 0.5).astype(int) == 0, 0.0, sigma)
        if sigma.any():
            filtered = ndimage.gaussian_filter(image, sigma, cval=0, mode="mirror")
    out = ndimage.zoom(filtered, [1 / f for f in factors], order=1, mode="mirror", cval=0, grid_mode=True)
    np.clip(out, image.min(), image.max(), out=out)
    return out


def normalize(image01: np.ndarray) -> np.ndarray:
    """ImageNet normalization of an RGB image in [0, 1] (H, W, 3) -> float32."""
    return ((np.asarray(image01, np.float32) - _MEAN) / _STD).astype(np.float32)


def bucket_shape(height: int, width: int, bucket: int) -> tuple[int, int]:
    """(height, width) rounded up to multiples of `bucket`."""
    return -(-height // bucket) * bucket, -(-width // bucket) * bucket


class NetworkRunner:
    """Runs a predictor on one normalized (H, W, 3) image; exact or bucketed input shapes.

    Args:
      predictor: anything with `forward(x) -> dict of numpy arrays` for x of shape (1, H, W, 3), H and W
        multiples of 32 (`p3m_jax.inference.predictor.Predictor`, `export_formats.ExportedPredictor`); one whose
        `forward` takes `outputs` is asked for the wanted outputs only.
      bucket: None for exact shapes; else a multiple of 32: inputs are padded up to multiples of it.
    """

    def __init__(self, predictor, bucket: int | None = None):
        if bucket is not None and (bucket <= 0 or bucket % 32):
            raise ValueError(f"bucket must be a positive multiple of 32, got {bucket}")
        self.predictor = predictor
        self.bucket = bucket
        self._takes_outputs = _takes_outputs(predictor.forward)
        self.input_shapes = collections.Counter()  # network input shapes used (= compilations of forward)

    def network_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the network runs at for an input of (height, width)."""
        return bucket_shape(height, width, self.bucket) if self.bucket is not None else (height, width)

    def prepare(self, requests, *, wait: bool = True) -> None:
        """Compiles the network ahead of use for these ((height, width), outputs) requests, in that order,
        when the predictor can (`Predictor.compile_programs`); otherwise does nothing. With ``wait=False``
        the compilations go on in the background while the caller runs what is ready."""
        compile_programs = getattr(self.predictor, "compile_programs", None)
        if compile_programs is not None:
            compile_programs(
                [((1,) + self.network_shape(h, w) + (3,), outputs) for (h, w), outputs in requests], wait=wait
            )

    def pad(self, x: np.ndarray) -> np.ndarray:
        """`x` (H, W, C) padded (symmetric reflection) to `network_shape`; `x` itself when exact."""
        height, width = x.shape[:2]
        padded_h, padded_w = self.network_shape(height, width)
        if (padded_h, padded_w) == (height, width):
            return x
        return np.pad(x, ((0, padded_h - height), (0, padded_w - width), (0, 0)), mode="symmetric")

    def __call__(self, x: np.ndarray, outputs=None) -> dict[str, np.ndarray]:
        """The network's outputs for one normalized (H, W, 3) image, cropped back to (H, W); `outputs` names
        the ones wanted (default all; a predictor without that option computes all and the rest are dropped)."""
        height, width = x.shape[:2]
        x = self.pad(x)
        self.input_shapes[x.shape[:2]] += 1
        if outputs is not None and self._takes_outputs:
            out = self.predictor.forward(x[None], outputs=outputs)
        else:
            out = self.predictor.forward(x[None])
        if outputs is not None:
            out = {k: out[k] for k in outputs}
        return {k: np.asarray(v[0, :height, :width]) for k, v in out.items()}


def _takes_outputs(forward) -> bool:
    try:
        return "outputs" in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # a callable without a signature
        return False


def _as_runner(predictor_or_runner) -> Callable[[np.ndarray], dict]:
    if isinstance(predictor_or_runner, NetworkRunner):
        return predictor_or_runner
    return NetworkRunner(predictor_or_runner)


def _network_input(image01: np.ndarray, ratio: float) -> np.ndarray:
    height, width = image01.shape[:2]
    return normalize(resize_like_skimage(image01, protocol_size(height, width, ratio)))


def trimap_from_logits(logits: np.ndarray) -> np.ndarray:
    """argmax over the 3 classes of (H, W, 3) logits -> uint8 trimap 0 / 128 / 255."""
    return np.array([0, 128, 255], np.uint8)[np.argmax(logits, axis=-1)]


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    return image.astype(np.float64) / 255.0  # skimage's img_as_float


def predict_resize(predictor, image: np.ndarray) -> np.ndarray:
    """RESIZE strategy: alpha (H, W) float32 in [0, 1] for an RGB uint8 image (H, W, 3)."""
    image01 = _check_image(image)
    out = _as_runner(predictor)(_network_input(image01, GLOBAL_RATIO), outputs=("fusion",))
    return resize_like_skimage(out["fusion"][..., 0].astype(np.float32), image.shape[:2])


def predict_hybrid(predictor, image: np.ndarray) -> np.ndarray:
    """HYBRID strategy: alpha (H, W) float64 in [0, 1] for an RGB uint8 image (H, W, 3)."""
    image01 = _check_image(image)
    runner = _as_runner(predictor)
    size = image.shape[:2]
    # HYBRID uses `global` of the half-size pass and `local` of the full-size one: each pass computes only
    # that (the other branch's last blocks are skipped). The full-size program compiles in the background
    # while the half-size pass and the host-side resizing run (a shorter first image of each size).
    runner.prepare(
        [(protocol_size(*size, GLOBAL_RATIO), ("global",)), (protocol_size(*size, LOCAL_RATIO), ("local",))], wait=False
    )
    global_out = runner(_network_input(image01, GLOBAL_RATIO), outputs=("global",))
    trimap = trimap_from_logits(global_out["global"]).astype(np.float64) / 255.0  # img_as_float of uint8
    trimap = resize_like_skimage(trimap, size) * 255.0
    local_out = runner(_network_input(image01, LOCAL_RATIO), outputs=("local",))
    local = resize_like_skimage(local_out["local"][..., 0].astype(np.float32), size)
    # float64 like the authors' combination, so that `quantize` truncates exactly as they do
    return np.where(trimap == 255, 1.0, np.where(trimap == 0, 0.0, local.astype(np.float64)))


def predict_alpha(predictor, image: np.ndarray, strategy: str = "hybrid") -> np.ndarray:
    """Alpha (H, W) in [0, 1] of an RGB uint8 image with the strategy 'resize' or 'hybrid'."""
    strategy = strategy.lower()
    if strategy == "resize":
        return predict_resize(predictor, image)
    if strategy == "hybrid":
        return predict_hybrid(predictor, image)
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


def quantize(alpha: np.ndarray) -> np.ndarray:
    """8-bit alpha as the authors save it: (alpha * 255).astype(uint8) in the alpha's own float precision,
    i.e. truncation (values are clipped to [0, 1] first)."""
    alpha = np.asarray(alpha)
    if alpha.dtype.kind != "f":
        alpha = alpha.astype(np.float64)
    alpha = np.clip(alpha, 0, 1)
    return (alpha * alpha.dtype.type(255)).astype(np.uint8)
