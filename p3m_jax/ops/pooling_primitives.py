"""The poolings of `ops.pooling` as JAX primitives, for exporters that map each to a runtime's own
operator (the ONNX export's `MaxPool` with indices and `MaxUnpool`, `inference/onnx_pooling.py`).

Within `pooling_primitives()` the network's poolings bind these primitives instead of tracing their
slices and selects: the same results (each primitive's implementation and lowering is the kernel
itself), forward only (no gradient: for exporting the inference program).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import mlir

from p3m_jax.ops import pooling


def _primitive(name, fn, abstract_eval, multiple_results=False):
    prim = Primitive(name)
    prim.multiple_results = multiple_results
    prim.def_impl(fn)
    prim.def_abstract_eval(abstract_eval)
    mlir.register_lowering(prim, mlir.lower_fun(fn, multiple_results=multiple_results))
    return prim


def _max_pool_abstract(x, *, window, stride):
    n, h, w, c = x.shape
    return jax.core.ShapedArray(
        (n, pooling.pooled_size(h, window, stride, 0), pooling.pooled_size(w, window, stride, 0), c), x.dtype
    )


def _max_pool_with_argmax_abstract(x, *, window, stride, padding):
    n, h, w, c = x.shape
    shape = (n, pooling.pooled_size(h, window, stride, padding), pooling.pooled_size(w, window, stride, padding), c)
    return jax.core.ShapedArray(shape, x.dtype), jax.core.ShapedArray(shape, jnp.int32)


def _max_unpool_abstract(x, argmax, *, pool_window):
    del pool_window
    n, h, w, c = x.shape
    return jax.core.ShapedArray((n, 2 * h, 2 * w, c), x.dtype)


# PyTorch's MaxPool2d(window, stride) without padding: (N, H, W, C) -> (N, Ho, Wo, C).
max_pool_p = _primitive(
    "p3m_max_pool", lambda x, *, window, stride: pooling.max_pool_forward(x, window, stride), _max_pool_abstract
)
# `max_pool_with_argmax`: (pooled, offset dy * window + dx of each window's first maximum, int32).
max_pool_with_argmax_p = _primitive(
    "p3m_max_pool_with_argmax",
    lambda x, *, window, stride, padding: list(pooling.max_pool_with_argmax_forward(x, window, stride, padding)),
    _max_pool_with_argmax_abstract,
    multiple_results=True,
)
# `max_unpool_2x2` after a stride-2 pooling of window ``pool_window``: (N, h, w, C) -> (N, 2h, 2w, C).
max_unpool_p = _primitive(
    "p3m_max_unpool",
    lambda x, argmax, *, pool_window: pooling.max_unpool_forward(x, argmax, pool_window),
    _max_unpool_abstract,
)


def pooling_primitives():
    """Within this context (this thread), `pooling.max_pool`, `max_pool_with_argmax` and `max_unpool_2x2`
    bind `max_pool_p`, `max_pool_with_argmax_p` and `max_unpool_p`."""
    return pooling.replaced_by(
        {
            "max_pool": max_pool_p.bind,
            "max_pool_with_argmax": lambda x, **params: tuple(max_pool_with_argmax_p.bind(x, **params)),
            "max_unpool_2x2": max_unpool_p.bind,
        }
    )
