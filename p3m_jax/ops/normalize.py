"""The networks' input normalisation inside a compiled program."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from p3m_jax.common.constants import IMAGENET_MEAN, IMAGENET_STD


def normalize_uint8(image: jax.Array) -> jax.Array:
    """uint8 RGB (..., 3) in 0..255 -> the network's float32 input (ImageNet mean/std), jittable.

    The input pipelines ship uint8 to the devices (4x less traffic than float32) and call this
    inside the compiled step.
    """
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (image.astype(jnp.float32) / 255.0 - mean) / std
