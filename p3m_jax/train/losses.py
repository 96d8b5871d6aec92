"""P3M-Net training losses (docs/design.md section 4), in float32, NHWC.

Every sum and mean runs over the whole batch at once, as the authors' training code does (it
does not average per sample). The terms:

- ``cross_entropy_loss``: trimap 0 -> class 0, 255 -> class 2, anything else -> class 1,
  mean over all pixels of the batch.
- ``alpha_loss``: sum(sqrt((p - a)^2 w^2 + 1e-12)) / (sum(w) + 1) with w the unknown-region
  mask; without a mask, divided by the pixel count (the epsilon term is summed over all pixels
  in both cases, as in the public code).
- ``laplacian_loss``: sum over a 5-level Laplacian pyramid (5 band-pass levels and the final
  low-pass) of mean |L(p w) - L(a w)|; the public 5x5 kernel (a *sum* of two 1-D exponentials,
  not a true Gaussian), replicate padding, 2x2 average pooling between levels.
- ``composition_loss``: sum over channels and pixels of
  sqrt((p fg + (1 - p) bg - image)^2 + 1e-12) divided by the pixel count (not 3x it).
- ``p3m_loss``: L = L_global / 6 + 2 L_local + 3 L_fusion + L_comp.

Gradient accumulation splits a batch into micro-batches. `loss_normalizers` computes the two
data-dependent denominators (the unknown-region pixel count, the fg/bg pixel count) over the
whole batch; `p3m_loss` with those and ``batch_size`` returns a micro-batch's exact share of the
whole batch's loss, so the micro-batch losses and gradients sum to the whole batch's.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

EPSILON = 1e-12
PYRAMID_LEVELS = 5
UNKNOWN = 128.0

# Weights of the total loss. The released code adds the fusion term twice plus once more.
GLOBAL_WEIGHT = 1.0 / 6.0
LOCAL_WEIGHT = 2.0
FUSION_WEIGHT = 3.0
COMPOSITION_WEIGHT = 1.0


def _laplacian_kernel(size: int = 5) -> np.ndarray:
    """The public code's 5x5 'Gaussian': K[i, j] ~ exp(-(i-2)^2) + exp(-(j-2)^2), sum 1."""
    g = np.exp(-np.square(np.arange(size, dtype=np.float64) - size // 2))
    k = g[:, None] + g[None, :]
    return (k / k.sum()).astype(np.float32)


_KERNEL = _laplacian_kernel()


def trimap_classes(trimap: jax.Array) -> jax.Array:
    """Class labels of a 0/128/255 trimap (any shape): 0 -> 0, 255 -> 2, else 1 (int32)."""
    return jnp.where(trimap == 0, 0, jnp.where(trimap == 255, 2, 1)).astype(jnp.int32)


def cross_entropy_loss(logits: jax.Array, trimap: jax.Array) -> jax.Array:
    """Mean cross-entropy of (N, H, W, 3) logits against an (N, H, W, 1) 0/128/255 trimap."""
    logits = logits.astype(jnp.float32)
    labels = trimap_classes(trimap[..., 0])
    logp = jax.nn.log_softmax(logits, axis=-1)
    # A one-hot product rather than a gather: cheap, and sharding-friendly.
    picked = jnp.sum(logp * jax.nn.one_hot(labels, logits.shape[-1], dtype=logp.dtype), axis=-1)
    return -jnp.mean(picked)


def unknown_mask(trimap: jax.Array) -> jax.Array:
    """1.0 where the trimap is 128 (the transition region), else 0.0 (float32)."""
    return (trimap == UNKNOWN).astype(jnp.float32)


def alpha_loss(
    pred: jax.Array, alpha: jax.Array, weight: jax.Array | None = None, denominator: jax.Array | None = None
) -> jax.Array:
    """The authors' alpha L1 (Charbonnier with eps 1e-12).

    With ``weight`` (the unknown mask): sum(sqrt(((p - a) w)^2 + eps)) / (sum(w) + 1), or divided
    by ``denominator`` when given. Without: sum(sqrt((p - a)^2 + eps)) / pixel count.
    """
    diff = pred.astype(jnp.float32) - alpha.astype(jnp.float32)
    if weight is None:
        return jnp.sum(jnp.sqrt(jnp.square(diff) + EPSILON)) / diff.size
    weight = weight.astype(jnp.float32)
    if denominator is None:
        denominator = jnp.sum(weight) + 1.0
    return jnp.sum(jnp.sqrt(jnp.square(diff * weight) + EPSILON)) / denominator


def _blur(x: jax.Array) -> jax.Array:
    """5x5 filter of an (N, H, W, 1) map with replicate padding."""
    r = _KERNEL.shape[0] // 2
    xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    kernel = jnp.asarray(_KERNEL)[:, :, None, None]
    return jax.lax.conv_general_dilated(
        xp, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST
    )


def _avg_pool2(x: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2, odd trailing row/column dropped (PyTorch's floor)."""
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    x = x[:, : 2 * h2, : 2 * w2]
    return x.reshape(n, h2, 2, w2, 2, c).mean(axis=(2, 4))


def laplacian_pyramid(x: jax.Array, levels: int = PYRAMID_LEVELS) -> list[jax.Array]:
    """``levels`` band-pass maps followed by the final low-pass map."""
    pyramid = []
    for _ in range(levels):
        filtered = _blur(x)
        pyramid.append(x - filtered)
        x = _avg_pool2(filtered)
    pyramid.append(x)
    return pyramid


def laplacian_loss(pred: jax.Array, alpha: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """Sum over the pyramid's entries of mean |L(p w) - L(a w)| ((N, H, W, 1) maps)."""
    pred = pred.astype(jnp.float32)
    alpha = alpha.astype(jnp.float32)
    if weight is not None:
        weight = weight.astype(jnp.float32)
        pred, alpha = pred * weight, alpha * weight
    # The pyramid is linear: one pyramid of the difference equals the difference of two.
    return sum(jnp.mean(jnp.abs(level)) for level in laplacian_pyramid(pred - alpha))


def composition_loss(
    pred: jax.Array,
    image: jax.Array,
    fg: jax.Array,
    bg: jax.Array,
    valid: jax.Array | None = None,
    denominator: jax.Array | None = None,
) -> jax.Array:
    """sqrt((p fg + (1 - p) bg - image)^2 + eps) summed over channels and pixels, / pixels.

    ``valid`` (N,) masks out samples without a foreground/background pair; the sum then runs
    over the valid samples and is divided by their pixel count (0 when none is valid), or by
    ``denominator`` when given.
    """
    pred = pred.astype(jnp.float32)
    comp = pred * fg.astype(jnp.float32) + (1.0 - pred) * bg.astype(jnp.float32)
    err = jnp.sqrt(jnp.square(comp - image.astype(jnp.float32)) + EPSILON)
    per_sample = jnp.sum(err, axis=(1, 2, 3))
    pixels = pred.shape[1] * pred.shape[2]
    valid = jnp.ones_like(per_sample) if valid is None else valid.astype(jnp.float32).reshape(-1)
    if denominator is None:
        denominator = jnp.maximum(jnp.sum(valid) * pixels, 1.0)
    return jnp.sum(per_sample * valid) / denominator


def loss_normalizers(batch: Mapping[str, jax.Array]) -> dict:
    """The denominators of `p3m_loss` that depend on the data, over all of ``batch`` (the float batch):
    ``unknown`` (transition pixels + 1), ``composition`` (pixels of the samples with fg/bg, at least
    1), and ``batch_size`` (a Python int, the divisor of the per-pixel means)."""
    trimap = batch["trimap"].astype(jnp.float32)
    n, h, w = trimap.shape[:3]
    valid = batch.get("has_fg_bg")
    valid = jnp.ones((n,), jnp.float32) if valid is None else valid.astype(jnp.float32).reshape(-1)
    return {
        "unknown": jnp.sum(unknown_mask(trimap)) + 1.0,
        "composition": jnp.maximum(jnp.sum(valid) * (h * w), 1.0),
        "batch_size": n,
    }


def p3m_loss(
    outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], normalizers: Mapping | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The P3M-Net training loss.

    Args:
      outputs: the model's dict of NHWC arrays: ``global``, ``side2``, ``side1``, ``side0``
        (N, H, W, 3) logits; ``local``, ``fusion`` (N, H, W, 1) alpha.
      batch: ``image``, ``fg``, ``bg`` (N, H, W, 3) ImageNet-normalised floats; ``alpha``
        (N, H, W, 1) in [0, 1]; ``trimap`` (N, H, W, 1) float 0/128/255; optional
        ``has_fg_bg`` (N,) — samples where it is false/0 are left out of the composition term,
        which is then normalised by the pixels of the remaining samples (the authors' loader
        always has fg/bg, where this equals their loss; the term is 0 if no sample has them).
      normalizers: `loss_normalizers` of the whole batch when ``batch`` is one of its
        micro-batches: the result is then this micro-batch's share of the whole batch's loss.

    Returns:
      ``(total, parts)`` with ``parts`` the unweighted ``global`` (sum of the three side CEs and
      3x the global CE), ``local`` (alpha + Laplacian on the unknown region), ``fusion`` (alpha
      + Laplacian on the whole image) and ``composition`` terms, and
      total = global / 6 + 2 local + 3 fusion + composition. All float32 scalars; sums and
      means run over the whole batch (not per sample). Computed in float32 whatever the
      network's compute dtype.
    """
    trimap = batch["trimap"].astype(jnp.float32)
    alpha = batch["alpha"].astype(jnp.float32)
    unknown_denominator = comp_denominator = None
    share = 1.0  # this batch's share of the per-pixel means
    if normalizers is not None:
        unknown_denominator, comp_denominator = normalizers["unknown"], normalizers["composition"]
        share = trimap.shape[0] / normalizers["batch_size"]
    mean_share = (lambda x: x) if share == 1.0 else (lambda x: x * share)
    l_global = (
        cross_entropy_loss(outputs["side2"], trimap)
        + cross_entropy_loss(outputs["side1"], trimap)
        + cross_entropy_loss(outputs["side0"], trimap)
        + 3.0 * cross_entropy_loss(outputs["global"], trimap)
    )
    l_global = mean_share(l_global)
    unknown = unknown_mask(trimap)
    local = outputs["local"].astype(jnp.float32)
    l_local = alpha_loss(local, alpha, unknown, unknown_denominator) + mean_share(laplacian_loss(local, alpha, unknown))
    fusion = outputs["fusion"].astype(jnp.float32)
    l_fusion = mean_share(alpha_loss(fusion, alpha) + laplacian_loss(fusion, alpha))
    l_comp = composition_loss(
        fusion, batch["image"], batch["fg"], batch["bg"], batch.get("has_fg_bg"), comp_denominator
    )
    total = GLOBAL_WEIGHT * l_global + LOCAL_WEIGHT * l_local + FUSION_WEIGHT * l_fusion + COMPOSITION_WEIGHT * l_comp
    parts = {"global": l_global, "local": l_local, "fusion": l_fusion, "composition": l_comp}
    return total, parts


__all__ = [
    "p3m_loss",
    "loss_normalizers",
    "cross_entropy_loss",
    "alpha_loss",
    "laplacian_loss",
    "composition_loss",
    "laplacian_pyramid",
    "trimap_classes",
    "unknown_mask",
]
