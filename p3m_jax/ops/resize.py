"""Bilinear upsampling by an integer factor with PyTorch's ``align_corners=False`` semantics (NHWC)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _upsample_axis(x: jax.Array, factor: int, axis: int) -> jax.Array:
    """Linear upsampling along one axis with half-pixel centres and edge clamping."""
    n = x.shape[axis]
    first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
    last = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
    prev = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
    nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), last], axis=axis)
    phases = []
    for p in range(factor):
        # Output f*i + p samples the input at i + t, t = (p + 0.5) / f - 0.5 in (-0.5, 0.5).
        t = (p + 0.5) / factor - 0.5
        if t >= 0:
            phases.append(x * (1.0 - t) + nxt * t if t else x)
        else:
            phases.append(prev * (-t) + x * (1.0 + t))
    out = jnp.stack(phases, axis=axis + 1)
    shape = list(x.shape)
    shape[axis] = n * factor
    return out.reshape(shape)


def upsample_bilinear(x: jax.Array, factor: int) -> jax.Array:
    """Bilinear upsampling of (N, H, W, C) by an integer factor, PyTorch ``align_corners=False``.

    Matches ``nn.Upsample(scale_factor=factor, mode='bilinear')``: half-pixel centres, source
    coordinates clamped at the borders. Written as ``factor`` static phases of a two-tap
    filter per axis (slices, multiplies, adds: no gather, no dense resize matrix), which is
    exact in the interpolation weights and cheap on every backend.
    """
    if factor == 1:
        return x
    return _upsample_axis(_upsample_axis(x, factor, 1), factor, 2)
