"""ViTAE-S encoder of P3M-Net(ViTAE-S) (the variant without reduction cells).

    layers.0.RC: conv stem 3->32 (+ReLU) -> f0 (H); pool; 32->64 (+ReLU) -> f1 (H/2); pool;
                 64->64 (no ReLU); LayerNorm                                 -> tokens (H/4)
    layers.0.NC: 2 normal cells, 64 dims, 1 head, Performer attention
    layers.i.RC (i = 1..3): LayerNorm -> feature (64 H/4, 128 H/8, 256 H/16); 2x2 max-pool
                 with indices; Linear in -> out (no bias)
    layers.i.NC: normal cells (depths 2, 12, 2; dims 128, 256, 512; heads 2, 4, 8) with
                 global softmax attention
    -> deep feature (512 ch, H/32), no final norm.

A normal cell is ``x = x + Attn(LN(x)) + PCM(x); x = x + MLP(LN(x))`` (LayerNorm eps 1e-6)
where PCM is a parallel convolution branch: conv3x3 (dim -> 4 dim), BN, SiLU, conv3x3
(4 dim -> dim), BN, SiLU, conv3x3 (dim -> dim), SiLU, all grouped (1, 32, 64, 128 groups).

The Performer's orthogonal random features are a fixed, non-trained variable
``constants/.../attn/w`` of shape (heads, head_dim / 2, head_dim), drawn from the init RNG (the
authors draw new ones whenever the model is constructed and never store them). The ImageNet
classifier ``head`` (512 -> 1000) and the Performer's never-applied ``norm1`` belong to the
authors' state dict and parameter count (27,463,052): they are created at initialization
so checkpoints round-trip, but never computed.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from p3m_jax.models.attention import Mlp, dense, global_attention, layer_norm
from p3m_jax.models.decoder import EncoderOutput
from p3m_jax.models.layers import BatchNorm, Dtype, conv2d
from p3m_jax.models.swin import PoolingPatchMerging, StemPoolingPatchEmbed

NORMAL_CELL_LAYER_NORM_EPS = 1e-6
PERFORMER_EPSILON = 1e-8  # the authors' "for stable in division"


def performer_features_init(key: jax.Array, num_heads: int, num_features: int, head_dim: int) -> jax.Array:
    """Orthogonal random features for the Performer, like the authors' construction:
    per head an (m, head_dim) matrix with orthonormal rows, scaled by sqrt(m)."""
    ortho = jax.nn.initializers.orthogonal()
    keys = jax.random.split(key, num_heads)
    w = jnp.stack([ortho(k, (num_features, head_dim), jnp.float32) for k in keys])
    return w * math.sqrt(num_features)


class Attention(nn.Module):
    """Global multi-head softmax self-attention: ``qkv`` (with bias) and ``proj``.

    Input and output (B, N, C) tokens.
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        head_dim = c // self.num_heads
        qkv = dense(3 * c, name="qkv", dtype=self.dtype)(x).reshape(b, n, 3, self.num_heads, head_dim)
        out = global_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return dense(c, name="proj", dtype=self.dtype)(out.reshape(b, n, c))


class PerformerAttention(nn.Module):
    """Linear attention with positive orthogonal random features (the authors'
    ``AttentionPerformer``): ``kqv`` emits k, q, v in that order; no 1/sqrt(d) scaling.

    Variables: ``kqv``, ``proj``, ``norm1`` (never applied, see the module docstring) and the
    constant ``w`` (heads, head_dim * kernel_ratio, head_dim). Computed in float32.
    """

    num_heads: int = 1
    kernel_ratio: float = 0.5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        head_dim = c // self.num_heads
        m = int(head_dim * self.kernel_ratio)
        w = self.variable(
            "constants", "w", lambda: performer_features_init(self.make_rng("params"), self.num_heads, m, head_dim)
        ).value
        if self.is_initializing():
            layer_norm(NORMAL_CELL_LAYER_NORM_EPS, name="norm1", dtype=self.dtype)(x)
        kqv = dense(3 * c, name="kqv", dtype=self.dtype)(x).astype(jnp.float32)
        kqv = kqv.reshape(b, n, 3, self.num_heads, head_dim)
        k, q, v = kqv[:, :, 0], kqv[:, :, 1], kqv[:, :, 2]  # (B, T, heads, head_dim)

        def features(t):
            # exp(w.t - |t|^2 / 2) / sqrt(m): positive random features of the softmax kernel.
            wt = jnp.einsum("bthi,hmi->bthm", t, w)
            return jnp.exp(wt - jnp.sum(t * t, axis=-1, keepdims=True) / 2) / math.sqrt(m)

        kp, qp = features(k), features(q)
        normalizer = jnp.einsum("bthm,bhm->bth", qp, jnp.sum(kp, axis=1))[..., None]
        kptv = jnp.einsum("bthn,bthm->bhnm", v, kp)
        y = jnp.einsum("bthm,bhnm->bthn", qp, kptv) / (normalizer + PERFORMER_EPSILON)
        y = y.reshape(b, n, c).astype(self.dtype)
        return dense(c, name="proj", dtype=self.dtype)(y)


class PCM(nn.Module):
    """The parallel convolution branch of a normal cell (the authors' ``PCM`` Sequential:
    children 0 conv, 1 BN, 3 conv, 4 BN, 6 conv; SiLUs at 2, 5, 7). NHWC in and out."""

    groups: int
    hidden_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        dim = x.shape[-1]
        hidden = int(dim * self.hidden_ratio)
        x = conv2d(hidden, 3, use_bias=True, groups=self.groups, name="0", dtype=self.dtype)(x)
        x = nn.silu(BatchNorm(dtype=self.dtype, name="1")(x, train))
        x = conv2d(dim, 3, use_bias=True, groups=self.groups, name="3", dtype=self.dtype)(x)
        x = nn.silu(BatchNorm(dtype=self.dtype, name="4")(x, train))
        x = conv2d(dim, 3, use_bias=True, groups=self.groups, name="6", dtype=self.dtype)(x)
        return nn.silu(x)


class NormalCell(nn.Module):
    """ViTAE normal cell on an NHWC map: attention + parallel convolutions, then the MLP."""

    num_heads: int
    groups: int
    performer: bool
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        b, h, w, c = x.shape
        conv_x = PCM(self.groups, self.mlp_ratio, dtype=self.dtype, name="PCM")(x, train)
        tokens = layer_norm(NORMAL_CELL_LAYER_NORM_EPS, name="norm1", dtype=self.dtype)(x)
        tokens = tokens.reshape(b, h * w, c)
        if self.performer:
            attn = PerformerAttention(self.num_heads, dtype=self.dtype, name="attn")(tokens)
        else:
            attn = Attention(self.num_heads, dtype=self.dtype, name="attn")(tokens)
        x = x + attn.reshape(b, h, w, c)
        x = x + conv_x
        y = layer_norm(NORMAL_CELL_LAYER_NORM_EPS, name="norm2", dtype=self.dtype)(x)
        return x + Mlp(int(c * self.mlp_ratio), dtype=self.dtype, name="mlp")(y)


class _NormalCells(nn.Module):
    """The ``NC`` ModuleList of one stage."""

    depth: int
    num_heads: int
    groups: int
    performer: bool
    mlp_ratio: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        for i in range(self.depth):
            x = NormalCell(self.num_heads, self.groups, self.performer, self.mlp_ratio, dtype=self.dtype, name=str(i))(
                x, train
            )
        return x


class _ViTAEStage(nn.Module):
    """One ``layers.i``: ``RC`` (the stem in stage 0, a pooling patch merging after), then
    the normal cells ``NC``. Returns ``(x, features, indices)`` of its RC."""

    token_dim: int
    depth: int
    num_heads: int
    groups: int
    performer: bool
    first: bool
    mlp_ratio: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        if self.first:
            x, feats, indices = StemPoolingPatchEmbed(self.token_dim, relu_last=False, dtype=self.dtype, name="RC")(x)
        else:
            x, idx, feat = PoolingPatchMerging(self.token_dim, dtype=self.dtype, name="RC")(x)
            feats, indices = [feat], [idx]
        x = _NormalCells(
            self.depth, self.num_heads, self.groups, self.performer, self.mlp_ratio, dtype=self.dtype, name="NC"
        )(x, train)
        return x, feats, indices


class _ViTAELayers(nn.Module):
    """The ``layers`` ModuleList."""

    token_dims: Sequence[int]
    depths: Sequence[int]
    num_heads: Sequence[int]
    groups: Sequence[int]
    mlp_ratio: float
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        # See ResNet34MP: rematerialised stages keep their names (same parameter tree);
        # ``train`` (argument 2, counting self) is static.
        stage_cls = nn.remat(_ViTAEStage, static_argnums=(2,)) if self.remat else _ViTAEStage
        feats, indices = [], []
        for i in range(len(self.depths)):
            x, f, idx = stage_cls(
                self.token_dims[i],
                self.depths[i],
                self.num_heads[i],
                self.groups[i],
                performer=(i == 0),
                first=(i == 0),
                mlp_ratio=self.mlp_ratio,
                dtype=self.dtype,
                name=str(i),
            )(x, train)
            feats += f
            indices += idx
        return x, feats, indices


class ViTAESmall(nn.Module):
    """The ViTAE-S encoder of P3M-Net(ViTAE-S); returns an `EncoderOutput`."""

    dtype: Dtype = jnp.float32
    token_dims: Sequence[int] = (64, 128, 256, 512)
    depths: Sequence[int] = (2, 2, 12, 2)
    num_heads: Sequence[int] = (1, 2, 4, 8)
    groups: Sequence[int] = (1, 32, 64, 128)
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    remat: bool = False  # rematerialise each stage in the backward pass (same parameter tree)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> EncoderOutput:
        x = x.astype(self.dtype)
        x, feats, indices = _ViTAELayers(
            tuple(self.token_dims),
            tuple(self.depths),
            tuple(self.num_heads),
            tuple(self.groups),
            self.mlp_ratio,
            dtype=self.dtype,
            remat=self.remat,
            name="layers",
        )(x, train)
        if self.is_initializing() and self.num_classes:
            # Create the ImageNet head's parameters only (see module docstring).
            dense(self.num_classes, name="head", dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))
        return EncoderOutput(deep=x, features=tuple(feats), indices=tuple(indices))
