"""Building blocks with PyTorch's exact semantics, written for XLA.

Everything here is NHWC. The layers reproduce what the authors' PyTorch model computes
(so the released weights give the same outputs) while staying friendly to TPUs: the
max-pooling argmax and the max-unpooling are written with static slices, compares and
selects only, never with a scatter or a gather.

Conventions shared by the whole `models` package:
- Parameter and submodule names mirror the attribute names of the authors' PyTorch modules
  (``conv1``, ``bn1``, ``decoder4_g``/``0``...), so that importing a PyTorch state dict is a
  mechanical renaming (see `p3m_jax.weights.torch_import`).
- ``dtype`` is the compute dtype (float32 or bfloat16); parameters are always float32.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any

# PyTorch defaults: BatchNorm2d(eps=1e-5, momentum=0.1), LayerNorm(eps=1e-5).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.1


def torch_conv_init(key, shape, dtype=jnp.float32):
    """PyTorch's default Conv2d/Linear weight init (kaiming_uniform with a=sqrt(5)).

    Equivalent to U(-1/sqrt(fan_in), 1/sqrt(fan_in)); ``shape`` is (..., fan_in_per_group, out).
    """
    fan_in = 1
    for d in shape[:-1]:
        fan_in *= d
    bound = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _lax_same_conv(x, kernel, groups):
    ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((ph, ph), (pw, pw)), dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups
    )


def _pad_same(x, kh, kw):
    """Zero-pads the spatial axes of NHWC ``x`` for a stride-1 'same' kh x kw convolution."""
    return jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))


def _tap_grouped_conv(x, kernel, groups):
    """The same grouped 'same' convolution as one batched matmul per kernel tap (used for the
    kernel gradient on CPU: the transpose of this form is XLA:CPU's fastest we measured)."""
    n, h, w, _ = x.shape
    kh, kw, cin_group, cout = kernel.shape
    xp = _pad_same(x, kh, kw)
    k = kernel.reshape(kh, kw, cin_group, groups, cout // groups)
    out = None
    for dy in range(kh):
        for dx in range(kw):
            tap = xp[:, dy : dy + h, dx : dx + w, :].reshape(n, h, w, groups, cin_group)
            term = jnp.einsum("nhwgc,cgo->nhwgo", tap, k[dy, dx])
            out = term if out is None else out + term
    return out.reshape(n, h, w, cout)


# `_small_group_conv` handles groups of at most this many input channels with no more output
# channels than input channels (ViTAE-S's parallel convolutions 16 -> 4 and 4 -> 4 per group).
# XLA's own convolution is as fast or faster for the expanding 4 -> 16 ones.
_MAX_SMALL_GROUP_CHANNELS = 16
# Up to this many products per output element the whole sum is one fused expression; beyond
# it (16 input channels per group: 144 products) a loop over the taps is faster.
_MAX_UNROLLED_PRODUCTS = 64


def _small_group_conv(x, kernel, groups):
    """A grouped 'same' convolution with few channels per group, as fused multiply-adds.

    XLA:CPU runs such convolutions far below the machine's speed. Here the channels are
    reordered group-minor, (..., channel in group, group), so that every product is a
    multiply-add over a contiguous run of groups, which vectorises, and XLA fuses the sum over
    taps and channels into one loop.

    The sum is materialised behind an optimization barrier: a plain fused expression would be
    fused into, and recomputed by, each of its elementwise consumers (the bias, BatchNorm's
    statistics, the activation). The barrier does what a loop over blocks of rows did, with less
    to compile. Computed in float32 whatever the input dtype.
    """
    n, h, w, cin = x.shape
    kh, kw, cin_group, cout = kernel.shape
    cout_group = cout // groups
    dtype = x.dtype
    xp = _pad_same(x.astype(jnp.float32), kh, kw)
    xp = xp.reshape(n, h + kh - 1, w + kw - 1, groups, cin_group).transpose(0, 1, 2, 4, 3)
    # (tap, channel in, channel out, group)
    k = kernel.astype(jnp.float32).reshape(kh * kw, cin_group, groups, cout_group)
    k = k.transpose(0, 1, 3, 2)

    def add_tap(acc, tap_input, tap_kernel):
        for c in range(cin_group):
            term = tap_input[..., c, None, :] * tap_kernel[c]
            acc = term if acc is None else acc + term
        return acc

    if kh * kw * cin_group <= _MAX_UNROLLED_PRODUCTS:
        out = None
        for t in range(kh * kw):
            dy, dx = divmod(t, kw)
            out = add_tap(out, xp[:, dy : dy + h, dx : dx + w], k[t])
    else:

        def tap(t, acc):
            tap_input = jax.lax.dynamic_slice(xp, (0, t // kw, t % kw, 0, 0), (n, h, w, cin_group, groups))
            return add_tap(acc, tap_input, k[t])

        out = jax.lax.fori_loop(0, kh * kw, tap, jnp.zeros((n, h, w, cout_group, groups), jnp.float32))
    out = jax.lax.optimization_barrier(out)
    return out.transpose(0, 1, 2, 4, 3).reshape(n, h, w, cout).astype(dtype)


def _is_small_group_conv(kernel_shape, groups):
    cin_group, cout_group = kernel_shape[2], kernel_shape[3] // groups
    return groups > 1 and cout_group <= cin_group <= _MAX_SMALL_GROUP_CHANNELS


# Up to this many pixels per image, an ungrouped convolution on the CPU is one matmul over its
# stacked taps (`_stacked_taps_conv`).
_STACKED_TAPS_MAX_PIXELS = 16 * 16


def _is_small_image_conv(x_shape, groups):
    return groups == 1 and x_shape[1] * x_shape[2] <= _STACKED_TAPS_MAX_PIXELS


def _stacked_taps_conv(x, kernel):
    """A stride-1 'same' convolution as one matmul: the kh * kw shifted windows of the zero-padded
    input stacked as (N, H, W, kh * kw, Cin) against the kernel as (kh * kw, Cin, Cout); products
    accumulate in float32. For small images (the deep stages, and every stage of a small training
    crop), where YNNPACK refuses a kernel larger than the image and XLA's own convolution is
    slow."""
    kh, kw, cin, cout = kernel.shape
    h, w = x.shape[1], x.shape[2]
    xp = _pad_same(x, kh, kw)
    taps = jnp.stack([xp[:, dy : dy + h, dx : dx + w] for dy in range(kh) for dx in range(kw)], axis=3)
    # (tap, Cin) contracted as two axes: merged into one (a reshaped kernel), the 8-device FSDP
    # P3M-CP step took 2m11s to compile instead of 80 s.
    out = jax.lax.dot_general(
        taps, kernel.reshape(kh * kw, cin, cout), (((3, 4), (0, 1)), ((), ())), preferred_element_type=jnp.float32
    )
    return out.astype(jnp.result_type(x, kernel))


def _cpu_same_conv(x, kernel, groups):
    if _is_small_group_conv(kernel.shape, groups):
        return _small_group_conv(x, kernel, groups)
    if _is_small_image_conv(x.shape, groups):
        return _stacked_taps_conv(x, kernel)
    return _lax_same_conv(x, kernel, groups)


def _input_grad_kernel(kernel, groups):
    """The kernel whose 'same' convolution of the output cotangent is the input gradient:
    taps flipped, input and output channels swapped within each group."""
    kh, kw, cin_group, cout = kernel.shape
    k = kernel[::-1, ::-1].reshape(kh, kw, cin_group, groups, cout // groups)
    return k.transpose(0, 1, 4, 3, 2).reshape(kh, kw, cout // groups, groups * cin_group)


# To fewer output channels than this (the heads' 64 -> 3 and 64 -> 1) the kernel gradient is one
# matmul against the stacked shifted cotangent (`_stacked_cotangent_kernel_grad`); from 8 output
# channels up XLA's gradient of the padded input's convolution is as fast, and from 16 faster.
_MIN_OUTPUT_CHANNELS_FOR_XLA_KERNEL_GRAD = 16


def _padded_grid_rows(x, g, kernel_shape):
    """``x`` and the cotangent ``g`` (N, H, W, C) as rows of the zero-padded (H + kh - 1) x
    (W + kw - 1) grid, ``x`` centred ('same' padding) and ``g`` at the grid's top-left, with the
    row offset dy * (W + kw - 1) + dx of every kernel tap in row-major order."""
    w = x.shape[2]
    kh, kw = kernel_shape[0], kernel_shape[1]
    grid_w = w + kw - 1
    xp = _pad_same(x, kh, kw).reshape(-1, x.shape[-1])
    gp = jnp.pad(g, ((0, 0), (0, kh - 1), (0, kw - 1), (0, 0))).reshape(-1, g.shape[-1])
    return xp, gp, [dy * grid_w + dx for dy in range(kh) for dx in range(kw)]


def _padded_input_kernel_grad(x, g, kernel_shape, kernel_dtype):
    """The kernel gradient of an ungrouped stride-1 'same' convolution: XLA's gradient of the
    'valid' convolution of the input zero-padded beforehand, in float32 whatever the input dtype.

    XLA:CPU's kernel gradient of the convolution with its padding inside is several times slower
    than of the same convolution on the padded input, and from 16 output channels this is also
    faster than matmul forms over the stacked taps.
    """
    kh, kw = kernel_shape[0], kernel_shape[1]
    xp = _pad_same(x, kh, kw).astype(jnp.float32)

    def convolve(kernel):
        return jax.lax.conv_general_dilated(xp, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    transpose = jax.linear_transpose(convolve, jax.ShapeDtypeStruct(kernel_shape, jnp.float32))
    (grad,) = transpose(g.astype(jnp.float32))
    return grad.astype(kernel_dtype)


def _stacked_cotangent_kernel_grad(x, g, kernel_shape, kernel_dtype):
    """The kernel gradient of a stride-1 'same' convolution with few output channels as one matmul.

    On the rows of the zero-padded (H + kh - 1) x (W + kw - 1) grid (`_padded_grid_rows`),
    tap t = (dy, dx) is sum_r xp[r] * gp[r - s_t] with s_t = dy * (W + kw - 1) + dx: the kh * kw
    shifted copies of the cotangent, stacked as the columns of one (rows, kh * kw * Cout) matrix,
    meet the padded input in a single matmul that reads the input once: for the output heads
    (64 -> 1 and 64 -> 3) this is faster than XLA:CPU's gradient, with or without the padding
    done beforehand.
    Shifted rows that fall before the first row, or into the previous row's or image's padding,
    are zeros of the cotangent. Products accumulate in float32 whatever the input dtype.
    """
    kh, kw, cin, cout = kernel_shape
    xp, gp, offsets = _padded_grid_rows(x, g, kernel_shape)
    rows, most = gp.shape[0], offsets[-1]
    gp = jnp.pad(gp, ((most, 0), (0, 0)))
    shifted = jnp.stack([gp[most - s : most - s + rows] for s in offsets], axis=1)
    out = jax.lax.dot_general(
        xp, shifted.reshape(rows, kh * kw * cout), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return out.reshape(cin, kh, kw, cout).transpose(1, 2, 0, 3).astype(kernel_dtype)


def _default_same_conv_vjp(groups, x, kernel, g):
    return jax.vjp(lambda a, b: _lax_same_conv(a, b, groups), x, kernel)[1](g)


def _cpu_same_conv_vjp(groups, x, kernel, g):
    if groups > 1:
        # The input gradient is a grouped convolution too (16 -> 4 per group for a 4 -> 16 one).
        gx = _cpu_same_conv(g, _input_grad_kernel(kernel, groups), groups)
        (gk,) = jax.vjp(lambda b: _tap_grouped_conv(x, b, groups), kernel)[1](g)
        return gx, gk
    if _is_small_image_conv(x.shape, groups):  # the matmul's own gradients: matmuls and slices
        return jax.vjp(_stacked_taps_conv, x, kernel)[1](g)
    (gx,) = jax.vjp(lambda a: _lax_same_conv(a, kernel, 1), x)[1](g)
    if kernel.shape[3] < _MIN_OUTPUT_CHANNELS_FOR_XLA_KERNEL_GRAD:
        return gx, _stacked_cotangent_kernel_grad(x, g, kernel.shape, kernel.dtype)
    return gx, _padded_input_kernel_grad(x, g, kernel.shape, kernel.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def same_conv(x: jax.Array, kernel: jax.Array, groups: int = 1) -> jax.Array:
    """Stride-1 'same' convolution, optionally grouped (NHWC input, HWIO kernel, odd sizes).

    Other backends use XLA's convolution and its gradients. XLA:CPU is slow on some shapes,
    so there the computation is written differently:
    - ungrouped on images of up to 16x16 pixels (the deep stages; every stage of a small
      training crop): one matmul over the stacked taps, and that matmul's gradients
      (`_stacked_taps_conv`; 20-30x faster where the kernel is larger than the image);
    - grouped: the input gradient is computed as the grouped convolution it is (flipped taps,
      channels swapped within groups), not by XLA's convolution gradient; convolutions from at
      most 16 channels per group to as many or fewer (ViTAE-S's 16 -> 4 and 4 -> 4, and as
      input gradients of its 4 -> 16) are `_small_group_conv`'s fused multiply-adds, 3-5x
      faster than XLA's with BatchNorm after them; the kernel gradient is that of an
      equivalent per-tap batched-matmul formulation (XLA's was about 100x slower than the
      forward pass);
    - ungrouped on larger images: XLA's input gradient (as fast as the forward pass) and, from 16
      output channels, XLA's kernel gradient of the convolution of the input padded beforehand
      (`_padded_input_kernel_grad`: with the padding inside the convolution XLA's kernel gradient
      is 1.5-3x slower), or, to fewer output channels (the heads), one matmul against the stacked
      shifted cotangent (`_stacked_cotangent_kernel_grad`, 2-2.5x faster than that).
    """
    return _platform_same_conv(x, kernel, groups)


def _platform_same_conv(x, kernel, groups):
    return jax.lax.platform_dependent(
        x,
        kernel,
        cpu=functools.partial(_cpu_same_conv, groups=groups),
        default=functools.partial(_lax_same_conv, groups=groups),
    )


def _same_conv_fwd(x, kernel, groups):
    return _platform_same_conv(x, kernel, groups), (x, kernel)


def _same_conv_bwd(groups, residuals, g):
    x, kernel = residuals
    return jax.lax.platform_dependent(
        x,
        kernel,
        g,
        cpu=functools.partial(_cpu_same_conv_vjp, groups),
        default=functools.partial(_default_same_conv_vjp, groups),
    )


same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


def pointwise_conv(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
    """A 1x1 convolution (kernel (1, 1, Cin, Cout)) as the matmul it is: 2-4x faster than
    XLA:CPU's convolution forward and backward; other backends lower both to the same GEMM."""
    return jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _flax_same_conv(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
):
    """`lax.conv_general_dilated` as flax's Conv calls it (stride 1, 'same' padding, set by
    `conv2d`), routed to `pointwise_conv` or `same_conv`."""
    del window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers
    if rhs.shape[0] == rhs.shape[1] == 1 and feature_group_count == 1:
        return pointwise_conv(lhs, rhs, precision)
    return _traced_once_same_conv(lhs, rhs, feature_group_count)


# `same_conv` under its own jit: JAX traces it once per distinct (shapes, dtypes, groups) and reuses that
# trace, and its lowering, for every other convolution of the same signature (ResNet-34's repeated blocks,
# ViTAE-S's cells), where inlined it would be traced again at each call. XLA inlines the call, so the
# compiled program is the same.
_traced_once_same_conv = jax.jit(same_conv, static_argnums=2)


def conv2d(
    features: int, kernel_size: int, *, use_bias: bool, name: str, groups: int = 1, dtype: Dtype = jnp.float32
) -> nn.Conv:
    """A stride-1 'same' convolution, as PyTorch's ``Conv2d(k, padding=k // 2)``."""
    pad = kernel_size // 2
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        feature_group_count=groups,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=torch_conv_init,
        name=name,
        conv_general_dilated=_flax_same_conv,
    )


class BatchNorm(nn.Module):
    """BatchNorm2d with PyTorch's semantics.

    Training mode normalizes with the batch statistics (biased variance) and updates the
    running statistics as PyTorch does: ``running = (1 - m) * running + m * batch`` with the
    *unbiased* batch variance, m = 0.1. (Flax's own BatchNorm keeps the biased variance, which
    drifts from PyTorch's running_var on small crops.) Under ``jax.jit`` with a data-sharded
    batch the mean and variance are global over the batch, i.e. synchronized across devices.

    Statistics are computed in float32 whatever the compute dtype.
    """

    epsilon: float = BN_EPSILON
    momentum: float = BN_MOMENTUM
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        reduce_axes = tuple(range(x.ndim - 1))
        if train:
            xf = x.astype(jnp.float32)
            mean = jnp.mean(xf, axis=reduce_axes)
            var = jnp.mean(jnp.square(xf - mean), axis=reduce_axes)
            if not self.is_initializing():
                count = 1
                for a in reduce_axes:
                    count *= x.shape[a]
                unbiased = var * (count / max(count - 1, 1))
                ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        # Folded into one multiply-add per element, with 1 / sqrt as PyTorch computes it.
        mul = scale / jnp.sqrt(var + self.epsilon)
        shift = bias - mean * mul
        return (x * mul.astype(self.dtype) + shift.astype(self.dtype)).astype(self.dtype)


class ConvBNReLUStack(nn.Module):
    """A PyTorch ``nn.Sequential`` of conv3x3 (+ BN + ReLU) triples.

    ``widths`` lists the output channels of each convolution. Submodules are named by their
    position in the PyTorch Sequential (conv at 3*i, BN at 3*i + 1; the ReLU at 3*i + 2 has no
    parameters). When ``plain_last`` is set the last convolution has no BN and no ReLU.
    The optional 2x bilinear upsampling the authors append does not change the numbering of
    the layers before it, so it is done by the caller.
    """

    widths: Sequence[int]
    plain_last: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        n = len(self.widths)
        for i, width in enumerate(self.widths):
            x = conv2d(width, 3, use_bias=True, name=str(3 * i), dtype=self.dtype)(x)
            if self.plain_last and i == n - 1:
                break
            x = BatchNorm(dtype=self.dtype, name=str(3 * i + 1))(x, train)
            x = nn.relu(x)
        return x


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
    """Plain max-pooling without padding (PyTorch ``MaxPool2d(window, stride)``).

    Written as one strided slice per window offset and a strict ">" select chain rather than
    XLA's reduce-window: the gradient then goes, like PyTorch's, to the first maximum of each
    window (ties are common after a ReLU), and on XLA:CPU it costs a few slices instead of
    the full-resolution index arrays that reduce-window's gradient builds.

    Where windows do not overlap (``stride >= window``: sBFI's 2x2 poolings at strides 2, 4
    and 8) the gradient is assembled from each window's argmax (`_disjoint_max_pool_grad`)
    instead of by differentiating the select chain. The differentiated chain pads each window
    offset's cotangent back to full resolution, a large backward fusion on the 512x512 stem
    feature of ResNet-34's sBFIs.
    """
    if stride >= window:
        return _disjoint_max_pool(x, window, stride, x.shape[1:3])
    return _max_pool_select_chain(x, window, stride)


def _max_pool_select_chain(x, window, stride):
    best = None
    for _, _, cand in _window_offsets(x, window, stride):
        best = cand if best is None else jnp.where(cand > best, cand, best)
    return best


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _disjoint_max_pool(x, window, stride, input_size):
    del input_size  # (H, W) of x, for the backward pass
    return _max_pool_select_chain(x, window, stride)


def _disjoint_max_pool_fwd(x, window, stride, input_size):
    del input_size
    pooled, argmax = _max_pool_with_argmax(x, window, stride, 0)
    # The offsets as int8 where they fit (windows up to 11x11): a quarter of the residual.
    return pooled, argmax.astype(jnp.int8) if window * window <= 128 else argmax


def _disjoint_max_pool_bwd(window, stride, input_size, argmax, g):
    return (_disjoint_max_pool_grad(g, argmax, input_size, window, stride),)


_disjoint_max_pool.defvjp(_disjoint_max_pool_fwd, _disjoint_max_pool_bwd)


def _disjoint_max_pool_grad(g, argmax, input_size, window, stride):
    """The input gradient of a max-pooling whose windows do not overlap (stride >= window):
    each window's cotangent ``g`` at its argmax offset, zero elsewhere.

    Window (i, j) covers pixels (stride i + dy, stride j + dx), dy, dx < window: one
    (window x window) block per window, padded to (stride x stride), tiles the plane, so the
    gradient is a select per pixel and reshapes, with no scatter and no sum.
    """
    n, ho, wo, c = g.shape
    h, w = input_size
    offsets = (
        jnp.arange(window, dtype=argmax.dtype)[:, None, None] * window
        + jnp.arange(window, dtype=argmax.dtype)[None, None, :]
    )  # (window, 1, window)
    won = argmax[:, :, None, :, None, :] == offsets[..., None]  # (N, Ho, window, Wo, window, C)
    blocks = jnp.where(won, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    extra = stride - window
    blocks = jnp.pad(blocks, ((0, 0), (0, 0), (0, extra), (0, 0), (0, extra), (0, 0)))
    plane = blocks.reshape(n, ho * stride, wo * stride, c)
    # The last windows may end before the plane does (or their padding past it).
    return jax.lax.pad(
        plane, jnp.zeros((), g.dtype), ((0, 0, 0), (0, h - ho * stride, 0), (0, w - wo * stride, 0), (0, 0, 0))
    )


def _window_offsets(x: jax.Array, window: int, stride: int):
    """Yields ``(dy, dx, values)`` for every offset of a pooling window in row-major order:
    ``values`` (N, Ho, Wo, C) is the strided slice of ``x`` (already padded) at that offset."""
    n, h, w, c = x.shape
    ho = (h - window) // stride + 1
    wo = (w - window) // stride + 1
    for dy in range(window):
        for dx in range(window):
            yield (
                dy,
                dx,
                jax.lax.slice(
                    x,
                    (0, dy, dx, 0),
                    (n, dy + (ho - 1) * stride + 1, dx + (wo - 1) * stride + 1, c),
                    (1, stride, stride, 1),
                ),
            )


def max_pool_with_argmax(x: jax.Array, window: int, stride: int, padding: int) -> tuple[jax.Array, jax.Array]:
    """Max-pooling that also says where in each window the maximum was.

    Args:
      x: (N, H, W, C).
      window, stride, padding: as PyTorch's ``MaxPool2d(window, stride, padding)`` (floor mode).

    Returns:
      ``(pooled, argmax)``, both (N, Ho, Wo, C). ``argmax`` holds the winner's offset inside its
      window, ``dy * window + dx`` (int32; `argmax_to_indices` turns it into PyTorch's flat
      indices). Padding never wins; on ties the first maximum in row-major order of the window
      wins, like PyTorch's CPU and CUDA kernels.

    The encoders hand ``argmax`` to `max_unpool_2x2` rather than flat indices: unpooling and the
    pooling gradient then compare it with constants instead of with a map of flat positions
    built from iotas, which is cheaper at full resolution.

    The gradient goes to each window's argmax, as PyTorch's. For stride 2 (every pooling in the
    three encoders) it is assembled from ``argmax`` (`_max_pool_grad_stride2`) rather than by
    differentiating the comparisons, whose fused backward is several times slower.
    """
    if stride == 2 and window <= 4:
        return _max_pool_with_argmax_stride2(x, window, padding, x.shape[1:3])
    return _max_pool_with_argmax(x, window, stride, padding)


def argmax_to_indices(argmax: jax.Array, window: int, stride: int, padding: int, input_width: int) -> jax.Array:
    """PyTorch's flat indices ``y * W + x`` (int32, into the unpadded input plane of width
    ``input_width``) from the window offsets of `max_pool_with_argmax`."""
    _, ho, wo, _ = argmax.shape
    rows = jnp.arange(ho, dtype=jnp.int32)[None, :, None, None] * stride - padding + argmax // window
    cols = jnp.arange(wo, dtype=jnp.int32)[None, None, :, None] * stride - padding + argmax % window
    return rows * input_width + cols


def max_pool_with_indices(x: jax.Array, window: int, stride: int, padding: int) -> tuple[jax.Array, jax.Array]:
    """`max_pool_with_argmax` with PyTorch's ``return_indices=True`` output: int32 flat positions
    ``y * W + x`` in the (unpadded) input plane instead of offsets inside the window."""
    pooled, argmax = max_pool_with_argmax(x, window, stride, padding)
    return pooled, argmax_to_indices(argmax, window, stride, padding, x.shape[2])


def _max_pool_with_argmax(x, window, stride, padding):
    neg = jnp.array(-jnp.inf, x.dtype)
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=neg)
    best = None
    best_code = None
    # One static strided slice per window offset, visited in row-major order: a strict
    # ">" keeps the first maximum, as PyTorch does.
    for dy, dx, cand in _window_offsets(xp, window, stride):
        if best is None:
            best = cand
            best_code = jnp.zeros(cand.shape, jnp.int32)
        else:
            better = cand > best
            best = jnp.where(better, cand, best)
            best_code = jnp.where(better, jnp.int32(dy * window + dx), best_code)
    return best, best_code


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_with_argmax_stride2(x, window, padding, input_size):
    del input_size  # (H, W) of x, for the backward pass
    return _max_pool_with_argmax(x, window, 2, padding)


def _max_pool_stride2_fwd(x, window, padding, input_size):
    del input_size
    pooled, argmax = _max_pool_with_argmax(x, window, 2, padding)
    return (pooled, argmax), argmax


def _max_pool_stride2_bwd(window, padding, input_size, argmax, cotangents):
    return (_max_pool_grad_stride2(cotangents[0], argmax, input_size, window, padding),)


_max_pool_with_argmax_stride2.defvjp(_max_pool_stride2_fwd, _max_pool_stride2_bwd)


def _max_pool_grad_stride2(g, argmax, input_size, window, padding):
    """The input gradient of a stride-2 max-pooling (window <= 4): each window's cotangent ``g``
    added at its argmax (offset dy * window + dx in the window), summed where overlapping
    windows chose the same pixel.

    Padded pixel (2i + a, 2j + b) lies in windows (i - ky, j - kx) at offset (a + 2 ky, b + 2 kx)
    wherever that offset is inside the window (ky, kx in {0, 1}): each of the four parity
    classes (a, b) is a sum of at most four shifted copies of ``g`` at the pooled resolution,
    each masked by its window's argmax being that offset, and the classes interleave into the
    padded plane, whose padding is then cut off.
    """
    n, ho, wo, c = g.shape
    h, w = input_size
    hc, wc = -(-(h + 2 * padding) // 2), -(-(w + 2 * padding) // 2)
    # One leading row/column for the shift by one window; trailing ones up to the class size.
    pads = ((0, 0), (1, max(0, hc - ho)), (1, max(0, wc - wo)), (0, 0))
    g = jnp.pad(g, pads)
    argmax = jnp.pad(argmax, pads, constant_values=-1)  # matches no offset
    classes = []
    for a in (0, 1):
        for b in (0, 1):
            value = jnp.zeros((n, hc, wc, c), g.dtype)
            for ky in (0, 1):
                for kx in (0, 1):
                    oy, ox = a + 2 * ky, b + 2 * kx
                    if oy >= window or ox >= window:
                        continue
                    gs = g[:, 1 - ky : 1 - ky + hc, 1 - kx : 1 - kx + wc]
                    won = argmax[:, 1 - ky : 1 - ky + hc, 1 - kx : 1 - kx + wc] == oy * window + ox
                    value = value + jnp.where(won, gs, 0)
            classes.append(value)
    return _interleave_2x2(classes)[:, padding : padding + h, padding : padding + w]


def _interleave_2x2(quads: list[jax.Array]) -> jax.Array:
    """(N, 2h, 2w, C) from four (N, h, w, C) arrays, ``quads[2a + b]`` holding pixels (2i + a, 2j + b)."""
    n, h, w, c = quads[0].shape
    q = jnp.stack(quads, axis=3).reshape(n, h, w, 2, 2, c)
    return q.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, c)


def _shift_up_left(a: jax.Array, dy: int, dx: int, fill) -> jax.Array:
    """b[i, j] = a[i + dy, j + dx] (zero-based, dy/dx >= 0), ``fill`` past the edge."""
    if dy == 0 and dx == 0:
        return a
    n, h, w, c = a.shape
    a = jnp.pad(a, ((0, 0), (0, dy), (0, dx), (0, 0)), constant_values=fill)
    return a[:, dy : dy + h, dx : dx + w, :]


def max_unpool_2x2(x: jax.Array, argmax: jax.Array, pool_window: int = 2) -> jax.Array:
    """PyTorch's ``F.max_unpool2d(x, indices, kernel_size=2, stride=2)``, without a scatter.

    Args:
      x: pooled values (N, h, w, C).
      argmax: the window offsets returned by `max_pool_with_argmax` for that pooling
        (``dy * window + dx``; PyTorch's flat indices carry the same information).
      pool_window: the window of the stride-2 pooling that produced ``argmax``: 2 (2x2, no
        padding; each window is its own 2x2 block) or 3 (3x3 with padding 1, as in the
        ResNet-34 variant; a window also reaches the first row/column of the next block).

    Returns:
      (N, 2h, 2w, C): every value written at its argmax in a zero map. Where several windows
      chose the same position (overlapping 3x3 windows) the value of the last window in
      row-major order is kept, which is PyTorch's CPU behaviour.

    The gradient is PyTorch's too: every window receives the output's cotangent at its own
    argmax (a gather), also where another window's value was kept there. Autodiff of the
    forward would send it to the kept window only, and the authors' ResNet-34 models were
    trained with PyTorch's rule.
    """
    if pool_window not in (2, 3):
        raise ValueError(f"pool_window must be 2 or 3, got {pool_window}")
    return _max_unpool(x, argmax, pool_window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _max_unpool(x, argmax, pool_window):
    return _max_unpool_forward(x, argmax, pool_window)


def _max_unpool_fwd(x, argmax, pool_window):
    return _max_unpool_forward(x, argmax, pool_window), argmax


def _max_unpool_bwd(pool_window, argmax, g):
    return _max_unpool_grad(g, argmax, pool_window), None


_max_unpool.defvjp(_max_unpool_fwd, _max_unpool_bwd)


def _max_unpool_forward(x, argmax, pool_window):
    padding = (pool_window - 1) // 2  # 0 for 2x2 windows, 1 for 3x3
    # Window (i, j) of a stride-2 pooling covers rows 2i - p .. 2i - p + k - 1. Output row
    # 2i + a can thus be written by windows i (k=2) or i and i + 1 (k=3, p=1, a=1), at
    # offset a + p - 2 dy inside window i + dy.
    reach = (0,) if pool_window == 2 else (0, 1)
    shifted = {
        (dy, dx): (_shift_up_left(x, dy, dx, 0), _shift_up_left(argmax, dy, dx, -1)) for dy in reach for dx in reach
    }
    quads = []
    for a in (0, 1):
        for b in (0, 1):
            value = jnp.zeros_like(x)
            # Windows in row-major order; a later match overwrites an earlier one.
            for dy in reach:
                for dx in reach:
                    oy, ox = a + padding - 2 * dy, b + padding - 2 * dx
                    if not (0 <= oy < pool_window and 0 <= ox < pool_window):
                        continue
                    xv, av = shifted[(dy, dx)]
                    value = jnp.where(av == oy * pool_window + ox, xv, value)
            quads.append(value)
    return _interleave_2x2(quads)  # quads[2a + b] holds output pixels (2i + a, 2j + b)


def _max_unpool_grad(g, argmax, pool_window):
    """PyTorch's ``max_unpool2d`` backward: window (i, j) takes ``g`` at its argmax, output
    pixel (2i - p + dy, 2j - p + dx), as one strided slice of ``g`` per window offset."""
    padding = (pool_window - 1) // 2
    # p rows/columns in front so that offset (dy, dx) of window (i, j) is gp[2i + dy, 2j + dx];
    # the padding is never an argmax, so its zeros are never taken.
    gp = jnp.pad(g, ((0, 0), (padding, 0), (padding, 0), (0, 0)))
    grad = None
    for dy, dx, cand in _window_offsets(gp, pool_window, 2):
        if grad is None:
            grad = jnp.zeros_like(cand)
        grad = jnp.where(argmax == dy * pool_window + dx, cand, grad)
    return grad


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
