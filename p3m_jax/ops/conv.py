"""Convolutions of the models: stride-1 'same' (optionally grouped) and 1x1, NHWC / HWIO.

`same_conv` dispatches on the platform (`ops.platform.by_platform`): XLA's own convolution on GPUs and
TPUs and in exported programs (`conv_xla`: one convolution for every runtime, and shapes that may be
symbolic), the rewrites of `conv_cpu` on XLA:CPU. `flax_conv_general_dilated` is what `nn.Conv` calls
instead of `lax.conv_general_dilated` in the models.
"""

from __future__ import annotations

import contextlib
import functools

import jax

from p3m_jax.ops.conv_cpu import cpu_same_conv, cpu_same_conv_vjp
from p3m_jax.ops.conv_xla import lax_same_conv, lax_same_conv_vjp
from p3m_jax.ops.platform import by_platform, is_portable, portable_program


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def same_conv(x: jax.Array, kernel: jax.Array, groups: int = 1) -> jax.Array:
    """Stride-1 'same' convolution, optionally grouped (NHWC input, HWIO kernel, odd sizes).

    XLA's convolution and its gradients on every backend but the CPU, which runs the rewrites of
    `p3m_jax.ops.conv_cpu` instead (same values; XLA:CPU is slow on some shapes).
    """
    return _platform_same_conv(x, kernel, groups)


def _platform_same_conv(x, kernel, groups):
    return by_platform(
        x,
        kernel,
        cpu=functools.partial(cpu_same_conv, groups=groups),
        accelerator=functools.partial(lax_same_conv, groups=groups),
    )


def _same_conv_fwd(x, kernel, groups):
    return _platform_same_conv(x, kernel, groups), (x, kernel)


def _same_conv_bwd(groups, residuals, g):
    x, kernel = residuals
    return by_platform(
        x,
        kernel,
        g,
        cpu=functools.partial(cpu_same_conv_vjp, groups),
        accelerator=functools.partial(lax_same_conv_vjp, groups),
    )


same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


def pointwise_conv(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
    """A 1x1 convolution (kernel (1, 1, Cin, Cout)) as the matmul it is: faster than XLA:CPU's
    convolution forward and backward; other backends lower both to the same GEMM."""
    return jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def flax_conv_general_dilated(
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
    return _traced_once_same_conv(lhs, rhs, feature_group_count, is_portable())


def _same_conv_in_mode(x, kernel, groups, portable):
    with portable_program() if portable else contextlib.nullcontext():
        return same_conv(x, kernel, groups)


# `same_conv` under its own jit: JAX traces it once per distinct (shapes, dtypes, groups, portability) and
# reuses that trace, and its lowering, for every other convolution of the same signature (ResNet-34's
# repeated blocks, ViTAE-S's cells), where inlined it would be traced again at each call. XLA inlines the
# call, so the compiled program is the same.
_traced_once_same_conv = jax.jit(_same_conv_in_mode, static_argnums=(2, 3))
