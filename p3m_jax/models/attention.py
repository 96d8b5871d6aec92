"""Transformer pieces shared by the Swin-T and ViTAE-S encoders.

- `dense`, `layer_norm`: Linear/LayerNorm with the initialisation the authors' transformers use
  (truncated normal std 0.02 for Linear weights, zero biases; LayerNorm ones/zeros); the
  LayerNorm (`LayerNorm`) is PyTorch's formula, with a hand-written backward pass on XLA:CPU.
- `Mlp`: Linear -> exact (erf) GELU -> Linear, PyTorch's ``nn.GELU()`` in PyTorch's own CPU
  formula (`gelu`; not the tanh approximation that is Flax's default).
- `global_attention`: softmax attention over all tokens (ViTAE-S). On GPUs and TPUs it is
  `jax.nn.dot_product_attention` in the compute dtype. On XLA:CPU, and in exported programs, it is
  written out with its backward pass (it keeps only the probabilities of all the logits-sized arrays,
  and XLA:CPU copies none of them) and split into chunks of queries when the full logits would be
  large, so that a 1088x1600 image (27,200 tokens in ViTAE's second stage) needs a bounded amount of
  memory.
- `windowed_attention`: softmax attention inside Swin-T's windows with an additive bias, written out
  on every platform.
- `DropPath`: stochastic depth (per-sample residual dropping) in training mode.

Which form of the LayerNorm and of attention runs is chosen when the program is lowered, by
`p3m_jax.ops.platform.by_platform`.

Shapes follow `jax.nn.dot_product_attention`: tokens (B, T, heads, head_dim).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from p3m_jax.models.layers import Dtype
from p3m_jax.ops.platform import by_platform

# Upper bound on the number of attention logits (batch x heads x queries x keys) computed at
# once by `global_attention`: 2**27 float32 logits are 512 MiB. (A batch of 8 training crops of
# 512x512 needs 2 chunks in ViTAE's stage 2; a 1088x1600 test image 12.)
MAX_LOGITS_PER_CHUNK = 2**27

trunc_normal_init = nn.initializers.truncated_normal(stddev=0.02)


def dense(features: int, *, name: str, use_bias: bool = True, dtype: Dtype = jnp.float32) -> nn.Dense:
    """A Linear layer initialised like the authors' transformers (``trunc_normal_(std=.02)``)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=trunc_normal_init,
        bias_init=nn.initializers.zeros,
        name=name,
    )


def layer_norm(epsilon: float, *, name: str, dtype: Dtype = jnp.float32) -> nn.Module:
    """PyTorch ``nn.LayerNorm(dim, eps=epsilon)`` over the last axis (statistics in float32)."""
    return LayerNorm(epsilon, dtype=dtype, name=name)


class LayerNorm(nn.Module):
    """PyTorch's ``nn.LayerNorm`` over the last axis: ``(x - mean) / sqrt(var + eps) * scale +
    bias`` with the biased variance of the centred values (as PyTorch computes it), statistics
    in float32, parameters ``scale`` and ``bias`` (the tree of Flax's ``nn.LayerNorm``).

    On XLA:CPU written with its own backward pass (`_layer_norm`), which keeps only the input and
    the per-token mean and 1/std: autodiff of Flax's ``nn.LayerNorm`` kept full-size broadcasts of
    ``scale * rsqrt(var)`` and ``rsqrt(var)`` as residuals, which XLA:CPU materialised. On GPUs and
    TPUs, and in exports, the same expression differentiated by JAX (`_standard_layer_norm`).
    """

    epsilon: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        epsilon = self.epsilon
        out = by_platform(
            x,
            scale,
            bias,
            cpu=lambda x, scale, bias: _layer_norm(x, scale, bias, epsilon),
            accelerator=lambda x, scale, bias: _standard_layer_norm(x, scale, bias, epsilon),
        )
        return out.astype(self.dtype)


def _standard_layer_norm(x, scale, bias, epsilon):
    """The float32 LayerNorm expression, left to JAX's autodiff and XLA's fusions (GPUs, TPUs)."""
    return _layer_norm_statistics(x, epsilon)[0] * scale + bias


def _layer_norm_statistics(x, epsilon):
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + epsilon)
    return centred * rstd, mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, epsilon):
    """Float32 ``LayerNorm(x) * scale + bias`` over the last axis, with a hand-written VJP."""
    return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
    normalized, mean, rstd = _layer_norm_statistics(x, epsilon)
    return normalized * scale + bias, (x, mean, rstd, scale)


def _layer_norm_bwd(epsilon, residuals, g):
    x, mean, rstd, scale = residuals
    normalized = (x.astype(jnp.float32) - mean) * rstd
    g = g.astype(jnp.float32)
    batch_axes = tuple(range(g.ndim - 1))
    g_scale = jnp.sum(g * normalized, axis=batch_axes)
    g_bias = jnp.sum(g, axis=batch_axes)
    g_normalized = g * scale
    # d/dx of (x - mean) * rstd: rstd * (dy - mean(dy) - y * mean(dy * y)), y the normalized input.
    g_x = rstd * (
        g_normalized
        - jnp.mean(g_normalized, axis=-1, keepdims=True)
        - normalized * jnp.mean(g_normalized * normalized, axis=-1, keepdims=True)
    )
    return g_x.astype(x.dtype), g_scale, g_bias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as PyTorch computes it on the CPU, ``x / 2 * (1 + erf(x / sqrt(2)))`` (Flax's
    exact GELU goes through erfc, which XLA:CPU computes with an exponential)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


class Mlp(nn.Module):
    """The transformer MLP: fc1 -> GELU (exact) -> fc2 (dropout rates are 0 in P3M-Net)."""

    hidden_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_features = x.shape[-1]
        x = dense(self.hidden_features, name="fc1", dtype=self.dtype)(x)
        x = gelu(x)
        return dense(out_features, name="fc2", dtype=self.dtype)(x)


def global_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, max_logits_per_chunk: int = MAX_LOGITS_PER_CHUNK
) -> jax.Array:
    """Softmax attention of every query over every key, ``softmax(q k^T / sqrt(d)) v``.

    Args:
      q: (B, T, heads, head_dim) queries; k, v: (B, S, heads, head_dim) keys and values.
      max_logits_per_chunk: on XLA:CPU and in exports, when B * heads * T * S exceeds this, the
        queries are processed in sequential chunks (`jax.lax.map`) so that at most about this
        many logits exist at once; each chunk is rematerialised in the backward pass
        (`jax.checkpoint`), so training memory is bounded too. Every query still sees every key:
        the result is the same as unchunked attention.

    Returns:
      (B, T, heads, head_dim), in the dtype of ``q``. Logits and softmax are computed in
      float32 (on GPUs and TPUs the matmuls' inputs stay in the compute dtype).
    """
    chunked = functools.partial(_chunked_attention, max_logits_per_chunk=max_logits_per_chunk)
    return by_platform(q, k, v, cpu=chunked, accelerator=jax.nn.dot_product_attention, portable=chunked)


def windowed_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention inside windows with additive logits, ``softmax(q k^T / sqrt(d) + bias + mask) v``,
    written out in the authors' order of operations (queries scaled in the compute dtype, float32
    logits, the bias, then the mask) on every platform: in a TPU compile of Swin-T's train step,
    `jax.nn.dot_product_attention` with the bias and mask broadcast moved more bytes for the same FLOPs
    and memory (the figures are in docs/performance.md).

    Args:
      q, k, v: (B * nW, n, heads, head_dim), the n tokens of each of the nW windows of B images.
      bias: (heads, n, n) float32, added to every window (Swin's relative position bias).
      mask: (nW, n, n) float32, added to the windows of every image, or None.

    Returns:
      (B * nW, n, heads, head_dim) in the dtype of ``q``; logits and softmax in float32.
    """
    bw, n, heads, head_dim = q.shape
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias[None]
    if mask is not None:
        num_windows = mask.shape[0]
        logits = logits.reshape(bw // num_windows, num_windows, heads, n, n)
        logits = (logits + mask[None, :, None]).reshape(bw, heads, n, n)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _chunked_attention(q, k, v, *, max_logits_per_chunk):
    """`global_attention` written for XLA:CPU: query chunks of `_softmax_attention`, in float32."""
    b, t, h, d = q.shape
    s = k.shape[1]
    dtype = q.dtype

    def attend(q_chunk):
        # float32 logits/softmax whatever the compute dtype (as PyTorch in float32).
        out = _softmax_attention(q_chunk.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
        return out.astype(dtype)

    # An exported program's batch is symbolic: its chunks are chosen as for one image.
    per_query = (b if isinstance(b, int) else 1) * h * s
    if per_query * t <= max_logits_per_chunk:
        return attend(q)
    chunk = max(1, max_logits_per_chunk // per_query)
    num_chunks = math.ceil(t / chunk)
    chunk = math.ceil(t / num_chunks)  # even chunks, less padding
    pad = num_chunks * chunk - t
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qp = qp.reshape(b, num_chunks, chunk, h, d).transpose(1, 0, 2, 3, 4)
    out = jax.lax.map(jax.checkpoint(attend), qp)  # (num_chunks, B, chunk, heads, d)
    out = out.transpose(1, 0, 2, 3, 4).reshape(b, num_chunks * chunk, h, d)
    return out[:, :t]


@jax.custom_vjp
def _softmax_attention(q, k, v):
    """``softmax(q k^T / sqrt(d)) v`` for float32 (B, T, heads, d) queries and (B, S, heads, d)
    keys and values, with a hand-written backward pass.

    Written out rather than through `jax.nn.dot_product_attention`, whose XLA:CPU program made
    ViTAE-S's train step slower and larger: it keeps several logits-sized
    arrays for the backward pass (this keeps only the probabilities, and the output) and
    multiplies the logits by a materialised logits-sized broadcast of the scale. The 1/sqrt(d)
    scale goes on the queries instead; for head_dim 64 (every ViTAE-S stage) it is 1/8, a power
    of two, so this rounds exactly as scaling the logits does.

    Every matmul is written head-major with the logits-sized operand in the layout XLA's
    batched dot takes as it is, and the key/value gradients are computed transposed
    (d x S): autodiff's form contracted the probabilities over their query axis, and XLA:CPU
    then copied the transposed logits-sized probabilities and logit gradients. Only the small
    (tokens x d) arrays are transposed here.

    The softmax backward's row sums ``sum_s g_probs * probs`` are taken as ``<g, out>`` per
    query instead (equal, since ``out = probs v`` and ``g_probs = g v^T``; FlashAttention's
    "D"), from the output kept as a residual: XLA:CPU fused the logits-sized product and its
    row reduction into the dot that makes ``g_probs``, and that YNNPACK fusion ran slower than
    its parts.
    """
    return _softmax_attention_fwd(q, k, v)[0]


def _softmax_attention_fwd(q, k, v):
    scaled_q = q * (1.0 / math.sqrt(q.shape[-1]))
    logits = jnp.einsum("bhtd,bhds->bhts", scaled_q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1))
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    probs = e / jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.einsum("bhts,bhsd->bhtd", probs, v.transpose(0, 2, 1, 3))
    out = out.transpose(0, 2, 1, 3)
    return out, (scaled_q, k, v, probs, out)


def _softmax_attention_bwd(residuals, g):
    scaled_q, k, v, probs, out = residuals
    g_heads = g.transpose(0, 2, 1, 3)  # (B, heads, T, d)
    g_probs = jnp.einsum("bhtd,bhds->bhts", g_heads, v.transpose(0, 2, 3, 1))
    # d softmax: p * (g_probs - <g_probs, p>) along the key axis, where <g_probs, p> = <g, out>.
    row_dot = jnp.sum(g * out, axis=-1).transpose(0, 2, 1)[..., None]  # (B, heads, T, 1)
    g_logits = probs * (g_probs - row_dot)
    g_q = jnp.einsum("bhts,bhsd->bhtd", g_logits, k.transpose(0, 2, 1, 3))
    g_q = g_q.transpose(0, 2, 1, 3) * (1.0 / math.sqrt(scaled_q.shape[-1]))
    # (d, S) = (d, T) @ (T, S): the big operand contracts over its rows, as it is stored.
    g_k = jnp.einsum("bhdt,bhts->bhds", scaled_q.transpose(0, 2, 3, 1), g_logits)
    g_v = jnp.einsum("bhdt,bhts->bhds", g.transpose(0, 2, 3, 1), probs)
    return g_q, g_k.transpose(0, 3, 1, 2), g_v.transpose(0, 3, 1, 2)


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


class DropPath(nn.Module):
    """Stochastic depth: in training, drops the whole residual branch of a sample with
    probability ``rate`` and rescales the kept ones by 1 / (1 - rate) (timm's ``DropPath``).

    Needs a ``'dropout'`` PRNG stream in training when ``rate > 0``; identity otherwise.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if not train or self.rate <= 0.0:
            return x
        if not self.has_rng("dropout"):
            raise ValueError(
                f"{'/'.join(self.path)}: stochastic depth (rate {self.rate:.3g} here) needs a "
                "'dropout' PRNG in training: call apply(..., train=True, rngs={'dropout': key}), "
                "or build the model with drop_path_rate=0.0"
            )
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))
