"""Swin-T "stem pooling" encoder of P3M-Net(Swin-T).

A convolutional stem with max-pooling replaces Swin's 4x4 patch embedding, and the patch
merging between stages is a max-pooling (with indices, for the local decoder's unpooling)
followed by a Linear C -> 2C, instead of Swin's 2x2 concatenation:

    patch_embed: conv3x3 3->48 + ReLU -> f0 (H); pool; conv3x3 48->96 + ReLU -> f1 (H/2); pool;
                 conv3x3 96->96 + ReLU; LayerNorm                            -> tokens (H/4)
    layers.i (i = 0..3): Swin blocks (depths 2, 2, 6, 2; heads 3, 6, 12, 24; dims 96..768),
                 then for i < 3 "downsample": LayerNorm -> feature f(2+i); pool; Linear C -> 2C
    norm: LayerNorm -> deep feature (768 ch, H/32)

Window attention uses window 7 in every stage, and the odd blocks of every stage shift the
windows by 3, whatever the input size. Maps whose sides are not multiples of 7 are zero-padded
at the bottom/right (after ``norm1``) and the attention mask keeps apart tokens that are not
neighbours in the image: the padding, and the rows/columns wrapped around by the cyclic
shift. The masks are built with numpy at trace time for the actual input size, so any size
that is a multiple of 32 works (the authors' model builds them for its 512x512 training size;
at 512x512 and at every size where the authors' code runs, both give the same result).
Module names mirror the authors' PyTorch attributes (``patch_embed.proj1``,
``layers.0.blocks.1.attn.qkv``, ``layers.2.downsample.linear``...).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

from p3m_jax.models.attention import DropPath, Mlp, dense, layer_norm, trunc_normal_init, windowed_attention
from p3m_jax.models.decoder import EncoderOutput
from p3m_jax.models.layers import Dtype, conv2d
from p3m_jax.ops.pooling import max_pool_with_argmax

SWIN_LAYER_NORM_EPS = 1e-5
# Value the authors add to the logits of masked pairs (not -inf: a fully masked row stays finite).
MASKED_LOGIT = -100.0


def relative_position_index(window: int) -> np.ndarray:
    """(window**2, window**2) int32 index into the (2*window-1)**2 relative-bias table.

    Entry [i, j] encodes the offset (dy, dx) from token j to token i of a window (row-major):
    ``(dy + window - 1) * (2 * window - 1) + (dx + window - 1)``.
    """
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    coords = coords.reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int32)


def padded_size(size: int, window: int) -> int:
    """``size`` rounded up to a multiple of ``window``."""
    return -(-size // window) * window


def _region_labels(size: int, window: int, shift: int) -> np.ndarray:
    """Region of every position of one axis after padding to a multiple of ``window`` and the
    cyclic shift by ``-shift``: 0 for image positions that did not wrap around, 1 for padding,
    2 for image positions that wrapped around from the start of the axis."""
    padded = padded_size(size, window)
    original = (np.arange(padded) + shift) % padded  # position before the roll
    labels = np.zeros(padded, np.int32)
    labels[original >= size] = 1
    labels[original < shift] = 2
    return labels


def window_region_labels(height: int, width: int, window: int, shift: int) -> np.ndarray | None:
    """Region label of every token of every (shifted) window of a ``height`` x ``width`` map.

    Returns (num_windows, window**2) int32, windows row-major over the padded map, or None
    when no window mixes regions (no shift and no padding). Two tokens of a window may attend
    to each other iff their labels are equal: the regions are, per axis, the image, the
    padding, and the image rows/columns wrapped around by the cyclic shift.
    """
    if shift == 0 and height % window == 0 and width % window == 0:
        return None
    rows = _region_labels(height, window, shift)
    cols = _region_labels(width, window, shift)
    labels = rows[:, None] * 3 + cols[None, :]  # (Hp, Wp)
    hp, wp = labels.shape
    windows = labels.reshape(hp // window, window, wp // window, window)
    return windows.transpose(0, 2, 1, 3).reshape(-1, window * window).astype(np.int32)


def window_attention_mask(height: int, width: int, window: int, shift: int) -> np.ndarray | None:
    """Additive attention mask of the (shifted) windows of a ``height`` x ``width`` map:
    (num_windows, window**2, window**2) float32, 0 where two tokens may attend to each other
    and `MASKED_LOGIT` where not (see `window_region_labels`), or None when nothing is masked.
    (The model builds the same mask inside the graph from the much smaller labels.)"""
    labels = window_region_labels(height, width, window, shift)
    return None if labels is None else np.asarray(_mask_from_labels(labels))


def _mask_from_labels(labels) -> jax.Array:
    labels = jnp.asarray(labels)
    differ = labels[:, :, None] != labels[:, None, :]
    return jnp.where(differ, jnp.float32(MASKED_LOGIT), jnp.float32(0.0))


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """(B, H, W, C) with H, W multiples of ``window`` -> (B * nW, window**2, C), windows
    row-major per image."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: jax.Array, window: int, height: int, width: int) -> jax.Array:
    """Inverse of `window_partition`: (B * nW, window**2, C) -> (B, height, width, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, height // window, width // window, window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias.

    Input (B * nW, window**2, C) tokens; ``labels`` (nW, window**2) region labels from
    `window_region_labels` (tokens attend only to tokens with the same label) or None.
    Parameters: ``relative_position_bias_table`` ((2w-1)**2, heads), ``qkv`` (C -> 3C, bias),
    ``proj`` (C -> C).
    """

    num_heads: int
    window: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, labels: np.ndarray | None) -> jax.Array:
        bw, n, c = x.shape
        head_dim = c // self.num_heads
        table = self.param(
            "relative_position_bias_table", trunc_normal_init, ((2 * self.window - 1) ** 2, self.num_heads), jnp.float32
        )
        qkv = dense(3 * c, name="qkv", dtype=self.dtype)(x)
        qkv = qkv.reshape(bw, n, 3, self.num_heads, head_dim)
        index = relative_position_index(self.window).reshape(-1)
        bias = table[index].reshape(n, n, self.num_heads).transpose(2, 0, 1)
        mask = None if labels is None else _mask_from_labels(labels)
        out = windowed_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias, mask).reshape(bw, n, c)
        return dense(c, name="proj", dtype=self.dtype)(out)


class SwinBlock(nn.Module):
    """Swin Transformer block on an NHWC map: (shifted) window attention, then the MLP, both
    pre-norm and residual."""

    num_heads: int
    window: int = 7
    shift: int = 0
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        b, h, w, c = x.shape
        win, shift = self.window, self.shift
        hp, wp = padded_size(h, win), padded_size(w, win)
        shortcut = x
        x = layer_norm(SWIN_LAYER_NORM_EPS, name="norm1", dtype=self.dtype)(x)
        # Zero padding after the norm, as the authors' ConstantPad2d.
        x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
        if shift:
            x = jnp.roll(x, (-shift, -shift), axis=(1, 2))
        labels = window_region_labels(h, w, win, shift)  # static: numpy at trace time
        windows = window_partition(x, win)
        windows = WindowAttention(self.num_heads, win, dtype=self.dtype, name="attn")(windows, labels)
        x = window_reverse(windows, win, hp, wp)
        if shift:
            x = jnp.roll(x, (shift, shift), axis=(1, 2))
        x = x[:, :h, :w, :]
        x = shortcut + DropPath(self.drop_path)(x, train)
        y = layer_norm(SWIN_LAYER_NORM_EPS, name="norm2", dtype=self.dtype)(x)
        y = Mlp(int(c * self.mlp_ratio), dtype=self.dtype, name="mlp")(y)
        return x + DropPath(self.drop_path)(y, train)


class PoolingPatchMerging(nn.Module):
    """P3M's patch merging: LayerNorm, the normalised map as a skip feature, 2x2 max-pooling
    with its argmax, Linear C -> ``out_dim`` without bias.

    Returns ``(merged, indices, feature)``, ``indices`` being `max_pool_with_argmax`'s window
    offsets. Shared by the Swin-T and ViTAE-S encoders (which differ only in ``out_dim``).
    """

    out_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array):
        feature = layer_norm(1e-5, name="norm", dtype=self.dtype)(x)
        pooled, indices = max_pool_with_argmax(feature, 2, 2, 0)
        merged = dense(self.out_dim, use_bias=False, name="linear", dtype=self.dtype)(pooled)
        return merged, indices, feature


class _SwinBlocks(nn.Module):
    """The ``blocks`` ModuleList of one stage; odd blocks shift their windows."""

    depth: int
    num_heads: int
    window: int
    mlp_ratio: float
    drop_paths: Sequence[float]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        for i in range(self.depth):
            x = SwinBlock(
                self.num_heads,
                self.window,
                0 if i % 2 == 0 else self.window // 2,
                self.mlp_ratio,
                self.drop_paths[i],
                dtype=self.dtype,
                name=str(i),
            )(x, train)
        return x


class _SwinStage(nn.Module):
    """One ``layers.i``: Swin blocks, then (except in the last stage) the patch merging."""

    depth: int
    num_heads: int
    window: int
    mlp_ratio: float
    drop_paths: Sequence[float]
    downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = _SwinBlocks(
            self.depth, self.num_heads, self.window, self.mlp_ratio, self.drop_paths, dtype=self.dtype, name="blocks"
        )(x, train)
        if not self.downsample:
            return x, None, None
        return PoolingPatchMerging(2 * x.shape[-1], dtype=self.dtype, name="downsample")(x)


class _SwinLayers(nn.Module):
    """The ``layers`` ModuleList; returns the deep map and the three merging features and
    indices."""

    depths: Sequence[int]
    num_heads: Sequence[int]
    window: int
    mlp_ratio: float
    drop_path_rate: float
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        # See ResNet34MP: rematerialised stages keep their names, so the parameter tree is
        # unchanged; ``train`` (argument 2, counting self) is static.
        stage_cls = nn.remat(_SwinStage, static_argnums=(2,)) if self.remat else _SwinStage
        total = sum(self.depths)
        # Stochastic depth grows linearly over all blocks (the authors' ``dpr``).
        rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        feats, indices = [], []
        start = 0
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            last = i == len(self.depths) - 1
            x, idx, feat = stage_cls(
                depth,
                heads,
                self.window,
                self.mlp_ratio,
                tuple(rates[start : start + depth]),
                not last,
                dtype=self.dtype,
                name=str(i),
            )(x, train)
            start += depth
            if not last:
                feats.append(feat)
                indices.append(idx)
        return x, feats, indices


class StemPoolingPatchEmbed(nn.Module):
    """The convolutional stem with two 2x2 max-poolings (``patch_embed`` / ViTAE's
    ``layers.0.RC``): conv3x3 3->dim/2 + ReLU, pool, conv3x3 dim/2->dim + ReLU, pool,
    conv3x3 dim->dim (+ ReLU if ``relu_last``), LayerNorm.

    Returns ``(tokens (B, H/4, W/4, dim), [f0, f1], [idx0, idx1])`` with f0 the first conv's
    output (H) and f1 the second's (H/2), before their poolings, and idx0/idx1 their poolings'
    `max_pool_with_argmax` window offsets.
    """

    embed_dim: int
    relu_last: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array):
        f0 = nn.relu(conv2d(self.embed_dim // 2, 3, use_bias=True, name="proj1", dtype=self.dtype)(x))
        x, idx0 = max_pool_with_argmax(f0, 2, 2, 0)
        f1 = nn.relu(conv2d(self.embed_dim, 3, use_bias=True, name="proj2", dtype=self.dtype)(x))
        x, idx1 = max_pool_with_argmax(f1, 2, 2, 0)
        x = conv2d(self.embed_dim, 3, use_bias=True, name="proj3", dtype=self.dtype)(x)
        if self.relu_last:
            x = nn.relu(x)
        x = layer_norm(1e-5, name="norm", dtype=self.dtype)(x)
        return x, [f0, f1], [idx0, idx1]


class SwinTStemPooling(nn.Module):
    """The Swin-T stem-pooling encoder of P3M-Net(Swin-T); returns an `EncoderOutput`.

    Attributes:
      drop_path_rate: stochastic depth at the last block (linearly from 0 at the first); the
        authors train with 0.2. Only active with ``train=True``, where it needs a
        ``'dropout'`` PRNG stream.
      remat: rematerialise each Swin stage in the backward pass (saves activation memory;
        same parameter tree).
    """

    dtype: Dtype = jnp.float32
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> EncoderOutput:
        x = x.astype(self.dtype)
        x, feats, indices = StemPoolingPatchEmbed(self.embed_dim, relu_last=True, dtype=self.dtype, name="patch_embed")(
            x
        )
        x, stage_feats, stage_indices = _SwinLayers(
            tuple(self.depths),
            tuple(self.num_heads),
            self.window_size,
            self.mlp_ratio,
            self.drop_path_rate,
            dtype=self.dtype,
            remat=self.remat,
            name="layers",
        )(x, train)
        x = layer_norm(SWIN_LAYER_NORM_EPS, name="norm", dtype=self.dtype)(x)
        return EncoderOutput(deep=x, features=tuple(feats + stage_feats), indices=tuple(indices + stage_indices))
