"""The poolings exported as ONNX's own operators (`MaxPool` with indices, `MaxUnpool`): onnxruntime gives
exactly what the JAX functions give, ties and overlapping windows included."""

from __future__ import annotations

import collections

import jax
import numpy as np
import onnxruntime
import pytest

from p3m_jax.inference import export_formats
from p3m_jax.ops import pooling, pooling_primitives


def _tied(shape, seed):
    """Small integers after a ReLU: many windows hold several equal maxima (zeros above all)."""
    return np.maximum(np.random.default_rng(seed).integers(-3, 4, shape), 0).astype(np.float32)


def _onnx_run(fn, *inputs):
    """``fn`` exported as `export_onnx` exports the network, run by onnxruntime: (op counts, outputs)."""
    model = export_formats.onnx_model(fn, [x.shape for x in inputs], what="the test function")
    ops = collections.Counter(node.op_type for node in model.graph.node)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_inputs()]
    return ops, session.run(None, dict(zip(names, inputs)))


@pytest.mark.parametrize(
    "window, shape, through",
    [
        (3, (2, 20, 12, 3), False),  # ResNet-34's 3x3 poolings (padding 1): overlapping windows
        (3, (1, 11, 13, 2), False),  # odd sizes: the unpooled plane (12x14) is larger than the pooled input
        (2, (2, 16, 12, 3), False),  # the transformers' 2x2 poolings
        (3, (1, 12, 10, 2), True),  # offsets that another operation made
    ],
)
def test_pooling_and_unpooling_as_onnx_operators_match_jax(window, shape, through):
    padding = (window - 1) // 2
    x = _tied(shape, seed=sum(shape))
    n, h, w, c = shape
    pooled_shape = (n, (h + 2 * padding - window) // 2 + 1, (w + 2 * padding - window) // 2 + 1, c)
    # Unpooling other values than the maxima, as the decoder does: where overlapping windows chose the
    # same pixel, which window's value is kept shows.
    values = np.random.default_rng(1).standard_normal(pooled_shape).astype(np.float32)

    def fn(x, values):
        pooled, argmax = pooling.max_pool_with_argmax(x, window, 2, padding)
        if through:  # (not also an output: jax2onnx's transpose folding then loses the graph output)
            return pooled, pooling.max_unpool_2x2(values, argmax + 1 - 1, window)
        return pooled, argmax, pooling.max_unpool_2x2(values, argmax, window)

    expected = jax.jit(fn)(x, values)
    ops, got = _onnx_run(fn, x, values)
    assert ops["MaxPool"] == 1 and ops["MaxUnpool"] == 1 and "Where" not in ops and "Slice" not in ops
    names = ("pooled", "unpooled") if through else ("pooled", "argmax", "unpooled")
    for name, a, b in zip(names, got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, np.asarray(b), err_msg=name)


def test_unpooling_takes_onnx_indices_as_they_are():
    """Without the window offsets in the outputs, the graph keeps no conversion of the indices."""
    x = _tied((1, 16, 24, 4), seed=0)

    def fn(x):
        pooled, argmax = pooling.max_pool_with_argmax(x, 3, 2, 1)
        return pooling.max_unpool_2x2(pooled * 3.0 - 1.0, argmax, 3)

    ops, (got,) = _onnx_run(fn, x)
    assert not {"Mod", "Div", "Cast"} & set(ops)
    np.testing.assert_array_equal(got, np.asarray(jax.jit(fn)(x)))


@pytest.mark.parametrize("window, stride", [(2, 2), (3, 2)])
def test_plain_max_pool_as_onnx_operator_matches_jax(window, stride):
    x = _tied((2, 17, 12, 3), seed=window)

    def fn(x):
        return pooling.max_pool(x, window, stride)

    ops, (got,) = _onnx_run(fn, x)
    assert ops["MaxPool"] == 1 and "Where" not in ops
    np.testing.assert_array_equal(got, np.asarray(jax.jit(fn)(x)))


def test_primitives_compute_what_the_functions_compute():
    """Inside `pooling_primitives` (jitted and eager), the same results as outside it."""
    x = _tied((2, 10, 14, 3), seed=7)

    def fn(x):
        pooled, argmax = pooling.max_pool_with_argmax(x, 3, 2, 1)
        return pooling.max_pool(x, 2, 2), pooled, argmax, pooling.max_unpool_2x2(pooled + 1.0, argmax, 3)

    expected = jax.jit(fn)(x)
    with pooling_primitives.pooling_primitives():
        # New functions for jit and make_jaxpr: they would reuse the trace of fn made outside.
        assert "p3m_max_unpool" in str(jax.make_jaxpr(lambda x: fn(x))(x))
        for got in (jax.jit(lambda x: fn(x))(x), fn(x)):
            for a, b in zip(got, expected):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
