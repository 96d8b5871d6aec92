"""P3M-Net's bridges between the encoder and the two decoder branches.

- `TFI`, the tripartite-feature integration: fuses the semantic (global) decoder feature, the
  detail (local) decoder feature and the encoder skip feature at every local level.
- `SBFI`, the shallow bipartite-feature integration: injects the finest stem feature into the
  three finest local levels.
- `DBFI`, the deep bipartite-feature integration: injects the deepest encoder feature into the
  global branch and emits a side output (3-class logits) at full resolution.

Convolutions in the bridges have no bias (the authors' ``conv1x1``/``conv3x3`` helpers).
"""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from p3m_jax.models.layers import BatchNorm, Dtype, conv2d
from p3m_jax.ops.pooling import max_pool
from p3m_jax.ops.resize import upsample_bilinear


class TFI(nn.Module):
    """Tripartite-feature integration; one 1x1 ``transform`` is shared by all three inputs."""

    planes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, global_feature, local_feature, encoder_feature, train: bool):
        transform = conv2d(self.planes // 2, 1, use_bias=False, name="transform", dtype=self.dtype)
        x = jnp.concatenate([transform(global_feature), transform(local_feature), transform(encoder_feature)], axis=-1)
        x = conv2d(self.planes, 3, use_bias=False, name="conv1", dtype=self.dtype)(x)
        x = BatchNorm(dtype=self.dtype, name="bn1")(x, train)
        return nn.relu(x)


class SBFI(nn.Module):
    """Shallow bipartite-feature integration (residual).

    ``stride`` is the ratio between the stem feature's size and this level's size; the authors
    reduce the stem feature by a 2x2 max-pool with that stride (PyTorch ``MaxPool2d(2, stride)``).
    ``pooled_stem`` is the stem feature after the 2x2 max-pool with stride 2 (`pool_stem`), which
    the three sBFIs share: the 2x2 windows at stride 4 and 8 are every second and fourth window at
    stride 2, so their pooling (maxima, and gradients to the same argmax) is every (stride / 2)-th
    row and column of it: one pooling of the full-resolution stem feature instead of three.
    """

    planes: int
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, local_feature, pooled_stem, train: bool):
        a = conv2d(self.planes // 2, 1, use_bias=False, name="transform1", dtype=self.dtype)(local_feature)
        step = self.stride // 2
        b = pooled_stem[:, ::step, ::step]
        b = conv2d(self.planes // 2, 1, use_bias=False, name="transform2", dtype=self.dtype)(b)
        x = jnp.concatenate([a, b], axis=-1)
        x = conv2d(self.planes, 3, use_bias=False, name="conv1", dtype=self.dtype)(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
        return x + local_feature


def pool_stem(stem_feature):
    """The 2x2 max-pool with stride 2 of the stem feature that `SBFI` takes."""
    return max_pool(stem_feature, 2, 2)


class DBFI(nn.Module):
    """Deep bipartite-feature integration (residual) with a 3-class side output.

    ``stride`` is the ratio between this level's size and the deepest feature's size; the side
    output is upsampled by ``32 // stride`` to the input resolution.
    """

    planes: int
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, global_feature, deep_feature, train: bool):
        a = conv2d(self.planes // 2, 1, use_bias=False, name="transform1", dtype=self.dtype)(global_feature)
        b = conv2d(self.planes // 2, 1, use_bias=False, name="transform2", dtype=self.dtype)(deep_feature)
        b = upsample_bilinear(b, self.stride)
        x = jnp.concatenate([a, b], axis=-1)
        x = conv2d(self.planes, 3, use_bias=False, name="conv1", dtype=self.dtype)(x)
        x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, train))
        x = x + global_feature
        side = conv2d(3, 3, use_bias=False, name="conv2", dtype=self.dtype)(x)
        side = upsample_bilinear(side, 32 // self.stride)
        return x, side
