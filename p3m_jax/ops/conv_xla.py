"""XLA's own stride-1 'same' convolution: what every backend but the CPU runs, and its gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lax_same_conv(x, kernel, groups):
    """Stride-1 'same' convolution (NHWC input, HWIO kernel, odd sizes) with `lax.conv_general_dilated`."""
    ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((ph, ph), (pw, pw)), dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups
    )


def pad_same(x, kh, kw):
    """Zero-pads the spatial axes of NHWC ``x`` for a stride-1 'same' kh x kw convolution."""
    return jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))


def lax_same_conv_vjp(groups, x, kernel, g):
    return jax.vjp(lambda a, b: lax_same_conv(a, b, groups), x, kernel)[1](g)
