"""Max-pooling with PyTorch's exact semantics and its unpooling, NHWC, for the encoders' stems and the decoder.

Written with static slices, compares and selects only (never a scatter or a gather), so that they
lower well on TPUs; the gradients go, as PyTorch's do, to the first maximum of each window.

Within `replaced_by(forms)` the three public functions call an exporter's forms instead (this thread
only): `ops.pooling_primitives` binds one primitive each there, which the ONNX export turns into
`MaxPool` (with indices) and `MaxUnpool`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

_REPLACED = threading.local()  # the forms of `replaced_by`, per tracing thread


@contextlib.contextmanager
def replaced_by(forms: Mapping[str, Callable]):
    """Within the block, on this thread, ``max_pool``, ``max_pool_with_argmax`` and ``max_unpool_2x2``
    call ``forms[name]`` (with the same arguments, by keyword after the arrays) where given."""
    previous = getattr(_REPLACED, "forms", None)
    _REPLACED.forms = dict(forms)
    try:
        yield
    finally:
        _REPLACED.forms = previous


def _replacement(name: str) -> Callable | None:
    forms = getattr(_REPLACED, "forms", None)
    return forms.get(name) if forms else None


def pooled_size(size: int, window: int, stride: int, padding: int) -> int:
    """PyTorch's floor-mode output size of a pooling."""
    return (size + 2 * padding - window) // stride + 1


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
    if (form := _replacement("max_pool")) is not None:
        return form(x, window=window, stride=stride)
    if stride >= window:
        return _disjoint_max_pool(x, window, stride, x.shape[1:3])
    return max_pool_forward(x, window, stride)


def max_pool_forward(x, window, stride):
    best = None
    for _, _, cand in _window_offsets(x, window, stride):
        best = cand if best is None else jnp.where(cand > best, cand, best)
    return best


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _disjoint_max_pool(x, window, stride, input_size):
    del input_size  # (H, W) of x, for the backward pass
    return max_pool_forward(x, window, stride)


def _disjoint_max_pool_fwd(x, window, stride, input_size):
    del input_size
    pooled, argmax = max_pool_with_argmax_forward(x, window, stride, 0)
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
    if (form := _replacement("max_pool_with_argmax")) is not None:
        return form(x, window=window, stride=stride, padding=padding)
    if stride == 2 and window <= 4:
        return _max_pool_with_argmax_stride2(x, window, padding, x.shape[1:3])
    return max_pool_with_argmax_forward(x, window, stride, padding)


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


def max_pool_with_argmax_forward(x, window, stride, padding):
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
    return max_pool_with_argmax_forward(x, window, 2, padding)


def _max_pool_stride2_fwd(x, window, padding, input_size):
    del input_size
    pooled, argmax = max_pool_with_argmax_forward(x, window, 2, padding)
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
    if (form := _replacement("max_unpool_2x2")) is not None:
        return form(x, argmax, pool_window=pool_window)
    return _max_unpool(x, argmax, pool_window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _max_unpool(x, argmax, pool_window):
    return max_unpool_forward(x, argmax, pool_window)


def _max_unpool_fwd(x, argmax, pool_window):
    return max_unpool_forward(x, argmax, pool_window), argmax


def _max_unpool_bwd(pool_window, argmax, g):
    return _max_unpool_grad(g, argmax, pool_window), None


_max_unpool.defvjp(_max_unpool_fwd, _max_unpool_bwd)


def max_unpool_forward(x, argmax, pool_window):
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
