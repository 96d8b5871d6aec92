"""ONNX lowerings (jax2onnx plugins) of the pooling primitives of `ops.pooling`: ONNX's own `MaxPool` (with
`Indices`) and `MaxUnpool` instead of the window slices and selects the plain trace would give.

`ops.pooling_primitives.pooling_primitives()` makes the network bind those primitives while `export_formats.export_onnx` traces
it. onnxruntime then runs one pooling kernel per pooling, where it spent about half of ResNet-34's time on
the slices and selects (docs/performance.md).

Both ONNX operators follow PyTorch's rules, which the JAX primitives also follow: `MaxPool` keeps the first
maximum of a window in row-major order (onnxruntime compares with a strict ">") and never picks padding;
`MaxUnpool` writes the pooled values in order, so where two overlapping windows chose the same pixel the
later one is kept. The export tests check the exported networks against `Predictor.forward`.

Indices: ONNX's are flat positions in the whole (N, C, H, W) input. The primitive's second output is the
offset ``dy * window + dx`` inside each window, so the lowering converts; an unpooling whose pooling was
lowered here, to a plane of the pooled input's size, takes ONNX's indices as they are, and the conversion,
then unused, is dropped from the graph by jax2onnx.

Only jax2onnx's public plugin API is used: `plugin_system.register_primitive` and `PrimitiveLeafPlugin`,
and the lowering context's builder, names and value bindings; shapes and types are set with onnx_ir.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from jax2onnx.plugins.plugin_system import PrimitiveLeafPlugin, register_primitive

from p3m_jax.ops.pooling_primitives import max_pool_p, max_pool_with_argmax_p, max_unpool_p

TO_NCHW = (0, 3, 1, 2)
TO_NHWC = (0, 2, 3, 1)

# The key, in the (not serialised) analysis metadata of a lowered pooling's NHWC offsets value, of what
# the pooling made: (ONNX's indices, the offsets in NCHW, (H, W) of the pooled input).
POOLING_META = "p3m_jax.pooling"


def _node(ctx, op: str, *inputs, shape, dtype, name: str | None = None, **attributes):
    """One ONNX node with a single output of the given static shape and dtype."""
    out = getattr(ctx.builder, op)(*inputs, _outputs=[name or ctx.fresh_name(op)], **attributes)
    _typed(out, shape, dtype)
    return out


def _typed(value, shape, dtype) -> None:
    value.type = ir.TensorType(dtype)
    value.shape = ir.Shape([int(d) for d in shape])


def _const_i64(ctx, values, hint: str):
    """An INT64 initializer (scalar or array) of the graph being built."""
    return ctx.builder.add_initializer_from_array(ctx.fresh_name(hint), np.asarray(values, np.int64))


def _nchw(shape) -> tuple[int, int, int, int]:
    n, h, w, c = shape
    return n, c, h, w


def _output_name(ctx, var, hint: str) -> str:
    return getattr(ctx.get_value_for_var(var, name_hint=ctx.fresh_name(hint)), "name", None) or ctx.fresh_name(hint)


def _nchw_input(ctx, var, hint: str):
    """The NHWC float32 input ``var`` transposed to NCHW."""
    x = ctx.get_value_for_var(var, name_hint=ctx.fresh_name(hint))
    return _node(ctx, "Transpose", x, perm=TO_NCHW, shape=_nchw(var.aval.shape), dtype=ir.DataType.FLOAT)


def _bind_nhwc(ctx, var, value, hint: str, dtype=ir.DataType.FLOAT):
    """Binds ``var`` (NHWC) to the NCHW ``value`` transposed back; returns the bound value."""
    name = _output_name(ctx, var, hint)
    out = _node(ctx, "Transpose", value, perm=TO_NHWC, shape=tuple(var.aval.shape), dtype=dtype, name=name)
    ctx.bind_value_for_var(var, out)
    return out


def _lowering_of(primitive, onnx_op: str):
    """Registers the decorated plugin class as jax2onnx's lowering of ``primitive``."""
    return register_primitive(
        jaxpr_primitive=primitive.name,
        onnx=[{"component": onnx_op, "doc": f"https://onnx.ai/onnx/operators/onnx__{onnx_op}.html"}],
        since="p3m-jax",
        context="primitives.p3m_jax",
        component=primitive.name,
    )


def _window_starts(size: int, stride: int, padding: int, axis: int) -> np.ndarray:
    """Each window's first row (axis 2) or column (axis 3) in the unpadded plane, shaped to broadcast."""
    starts = np.arange(size, dtype=np.int64) * stride - padding
    return starts.reshape((1, 1, size, 1) if axis == 2 else (1, 1, 1, size))


@_lowering_of(max_pool_p, "MaxPool")
class MaxPoolPlugin(PrimitiveLeafPlugin):
    """`ops.pooling_primitives.max_pool_p` as Transpose -> MaxPool -> Transpose."""

    def lower(self, ctx, eqn) -> None:
        (x_var,), (y_var,) = eqn.invars, eqn.outvars
        window, stride = int(eqn.params["window"]), int(eqn.params["stride"])
        xt = _nchw_input(ctx, x_var, "pool_in")
        pooled = _node(
            ctx,
            "MaxPool",
            xt,
            kernel_shape=(window, window),
            strides=(stride, stride),
            shape=_nchw(y_var.aval.shape),
            dtype=ir.DataType.FLOAT,
        )
        _bind_nhwc(ctx, y_var, pooled, "max_pool")


@_lowering_of(max_pool_with_argmax_p, "MaxPool")
class MaxPoolWithArgmaxPlugin(PrimitiveLeafPlugin):
    """`ops.pooling_primitives.max_pool_with_argmax_p` as MaxPool with Indices, the indices turned into window offsets."""

    def lower(self, ctx, eqn) -> None:
        (x_var,), (y_var, argmax_var) = eqn.invars, eqn.outvars
        window, stride, padding = (int(eqn.params[k]) for k in ("window", "stride", "padding"))
        n, h, w, c = (int(d) for d in x_var.aval.shape)
        out_shape = tuple(int(d) for d in y_var.aval.shape)
        _, ho, wo, _ = out_shape
        f32, i64 = ir.DataType.FLOAT, ir.DataType.INT64
        nchw_out = _nchw(out_shape)

        xt = _nchw_input(ctx, x_var, "pool_in")
        pooled, indices = ctx.builder.MaxPool(
            xt,
            _outputs=[ctx.fresh_name("MaxPool"), ctx.fresh_name("MaxPool_indices")],
            kernel_shape=(window, window),
            strides=(stride, stride),
            pads=(padding,) * 4,
        )
        _typed(pooled, nchw_out, f32)
        _typed(indices, nchw_out, i64)
        _bind_nhwc(ctx, y_var, pooled, "max_pool")

        # The offset in the window: (row - window's first row) * window + (column - its first column).
        in_plane = _node(ctx, "Mod", indices, _const_i64(ctx, np.int64(h * w), "plane"), shape=nchw_out, dtype=i64)
        width = _const_i64(ctx, np.int64(w), "width")
        row = _node(ctx, "Div", in_plane, width, shape=nchw_out, dtype=i64)
        col = _node(ctx, "Mod", in_plane, width, shape=nchw_out, dtype=i64)
        dy = _node(
            ctx, "Sub", row, _const_i64(ctx, _window_starts(ho, stride, padding, 2), "rows"), shape=nchw_out, dtype=i64
        )
        dx = _node(
            ctx, "Sub", col, _const_i64(ctx, _window_starts(wo, stride, padding, 3), "cols"), shape=nchw_out, dtype=i64
        )
        scaled = _node(ctx, "Mul", dy, _const_i64(ctx, np.int64(window), "window"), shape=nchw_out, dtype=i64)
        offsets = _node(ctx, "Add", scaled, dx, shape=nchw_out, dtype=i64)
        offsets = _node(ctx, "Cast", offsets, to=int(ir.DataType.INT32), shape=nchw_out, dtype=ir.DataType.INT32)
        argmax = _bind_nhwc(ctx, argmax_var, offsets, "max_pool_argmax", dtype=ir.DataType.INT32)
        argmax.meta[POOLING_META] = (indices, offsets, (h, w))


@_lowering_of(max_unpool_p, "MaxUnpool")
class MaxUnpoolPlugin(PrimitiveLeafPlugin):
    """`ops.pooling_primitives.max_unpool_p` as MaxUnpool to a (2h, 2w) plane."""

    def lower(self, ctx, eqn) -> None:
        (x_var, argmax_var), (y_var,) = eqn.invars, eqn.outvars
        window = int(eqn.params["pool_window"])
        padding = (window - 1) // 2
        n, h, w, c = (int(d) for d in x_var.aval.shape)
        out_shape = tuple(int(d) for d in y_var.aval.shape)
        big_h, big_w = out_shape[1:3]

        xt = _nchw_input(ctx, x_var, "unpool_in")
        argmax = ctx.get_value_for_var(argmax_var, name_hint=ctx.fresh_name("unpool_argmax"))
        pooling = argmax.meta.get(POOLING_META)
        if pooling is not None and pooling[2] == (big_h, big_w):
            indices = pooling[0]  # ONNX's own, into a plane of the output's size
        else:
            if pooling is not None:
                offsets = pooling[1]
            else:  # offsets that another operation made
                offsets = _node(ctx, "Transpose", argmax, perm=TO_NCHW, shape=(n, c, h, w), dtype=ir.DataType.INT32)
            indices = self._indices_from_offsets(ctx, offsets, window, padding, (n, c, h, w), (big_h, big_w))
        unpooled = ctx.builder.MaxUnpool(
            xt,
            indices,
            _const_i64(ctx, np.asarray([n, c, big_h, big_w], np.int64), "unpool_shape"),
            _outputs=[ctx.fresh_name("MaxUnpool")],
            kernel_shape=(window, window),
            strides=(2, 2),
            pads=(padding,) * 4,
        )
        _typed(unpooled, (n, c, big_h, big_w), ir.DataType.FLOAT)
        _bind_nhwc(ctx, y_var, unpooled, "max_unpool")

    @staticmethod
    def _indices_from_offsets(ctx, offsets, window, padding, nchw, out_size):
        """ONNX's flat indices into the (N, C, 2h, 2w) output from the (NCHW, int32) window offsets."""
        n, c, h, w = nchw
        big_h, big_w = out_size
        i64 = ir.DataType.INT64
        offsets = _node(ctx, "Cast", offsets, to=int(i64), shape=nchw, dtype=i64)
        size = _const_i64(ctx, np.int64(window), "window")
        dy = _node(ctx, "Div", offsets, size, shape=nchw, dtype=i64)
        dx = _node(ctx, "Mod", offsets, size, shape=nchw, dtype=i64)
        row = _node(ctx, "Add", dy, _const_i64(ctx, _window_starts(h, 2, padding, 2), "rows"), shape=nchw, dtype=i64)
        col = _node(ctx, "Add", dx, _const_i64(ctx, _window_starts(w, 2, padding, 3), "cols"), shape=nchw, dtype=i64)
        flat = _node(ctx, "Mul", row, _const_i64(ctx, np.int64(big_w), "width"), shape=nchw, dtype=i64)
        flat = _node(ctx, "Add", flat, col, shape=nchw, dtype=i64)
        planes = (np.arange(n * c, dtype=np.int64) * (big_h * big_w)).reshape(n, c, 1, 1)
        return _node(ctx, "Add", flat, _const_i64(ctx, planes, "planes"), shape=nchw, dtype=i64)
