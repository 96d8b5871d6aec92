"""The convolution rewrites XLA:CPU runs instead of its own convolution (chosen only on the CPU).

XLA:CPU is slow on some convolution shapes, so there `p3m_jax.ops.conv.same_conv` computes them
differently (`cpu_same_conv` and its gradient `cpu_same_conv_vjp`):
- ungrouped on images of up to 16x16 pixels (the deep stages; every stage of a small training
  crop): one matmul over the stacked taps, and that matmul's gradients (`_stacked_taps_conv`);
- grouped: the input gradient is computed as the grouped convolution it is (flipped taps, channels
  swapped within groups); convolutions from at most 16 channels per group to as many or fewer
  (ViTAE-S's 16 -> 4 and 4 -> 4, and as input gradients of its 4 -> 16) are `_small_group_conv`'s
  fused multiply-adds; the kernel gradient is that of an equivalent per-tap batched matmul;
- ungrouped on larger images: XLA's input gradient and, from 16 output channels, XLA's kernel
  gradient of the convolution of the input padded beforehand (`_padded_input_kernel_grad`), or,
  to fewer output channels (the heads), one matmul against the stacked shifted cotangent
  (`_stacked_cotangent_kernel_grad`).
Measurements behind these choices are in docs/performance.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from p3m_jax.ops.conv_xla import lax_same_conv, pad_same


def _tap_grouped_conv(x, kernel, groups):
    """The same grouped 'same' convolution as one batched matmul per kernel tap (used for the
    kernel gradient on CPU: the transpose of this form is XLA:CPU's fastest we measured)."""
    n, h, w, _ = x.shape
    kh, kw, cin_group, cout = kernel.shape
    xp = pad_same(x, kh, kw)
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
    xp = pad_same(x.astype(jnp.float32), kh, kw)
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
    xp = pad_same(x, kh, kw)
    taps = jnp.stack([xp[:, dy : dy + h, dx : dx + w] for dy in range(kh) for dx in range(kw)], axis=3)
    # (tap, Cin) contracted as two axes: merged into one (a reshaped kernel), the sharded P3M-CP
    # step compiles much more slowly.
    out = jax.lax.dot_general(
        taps, kernel.reshape(kh * kw, cin, cout), (((3, 4), (0, 1)), ((), ())), preferred_element_type=jnp.float32
    )
    return out.astype(jnp.result_type(x, kernel))


def cpu_same_conv(x, kernel, groups):
    if _is_small_group_conv(kernel.shape, groups):
        return _small_group_conv(x, kernel, groups)
    if _is_small_image_conv(x.shape, groups):
        return _stacked_taps_conv(x, kernel)
    return lax_same_conv(x, kernel, groups)


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
    xp = pad_same(x, kh, kw).reshape(-1, x.shape[-1])
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
    xp = pad_same(x, kh, kw).astype(jnp.float32)

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


def cpu_same_conv_vjp(groups, x, kernel, g):
    if groups > 1:
        # The input gradient is a grouped convolution too (16 -> 4 per group for a 4 -> 16 one).
        gx = cpu_same_conv(g, _input_grad_kernel(kernel, groups), groups)
        (gk,) = jax.vjp(lambda b: _tap_grouped_conv(x, b, groups), kernel)[1](g)
        return gx, gk
    if _is_small_image_conv(x.shape, groups):  # the matmul's own gradients: matmuls and slices
        return jax.vjp(_stacked_taps_conv, x, kernel)[1](g)
    (gx,) = jax.vjp(lambda a: lax_same_conv(a, kernel, 1), x)[1](g)
    if kernel.shape[3] < _MIN_OUTPUT_CHANNELS_FOR_XLA_KERNEL_GRAD:
        return gx, _stacked_cotangent_kernel_grad(x, g, kernel.shape, kernel.dtype)
    return gx, _padded_input_kernel_grad(x, g, kernel.shape, kernel.dtype)
