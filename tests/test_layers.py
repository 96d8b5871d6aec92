"""Layers and bridges against PyTorch's own functions/modules with the same weights."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jax
import jax.numpy as jnp

from p3m_jax.models import layers
from p3m_jax.ops import conv as conv_ops
from p3m_jax.ops import conv_cpu, conv_xla, pooling, resize
from p3m_jax.models.bridges import DBFI, SBFI, TFI, pool_stem

RTOL = ATOL = 1e-5


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def conv_kernel(w):
    """PyTorch OIHW weight -> Flax HWIO kernel."""
    return w.detach().numpy().transpose(2, 3, 1, 0)


@pytest.mark.parametrize("window,padding,shape", [(3, 1, (2, 16, 12, 3)), (2, 0, (1, 8, 14, 5))])
def test_max_pool_indices_match_torch(window, padding, shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    y, idx = pooling.max_pool_with_indices(jnp.asarray(x), window, 2, padding)
    ty, tidx = F.max_pool2d(nchw(x), window, 2, padding, return_indices=True)
    np.testing.assert_array_equal(np.asarray(y), nhwc(ty))
    np.testing.assert_array_equal(np.asarray(idx), nhwc(tidx))


@pytest.mark.parametrize(
    "window,padding,shape",
    [(3, 1, (2, 16, 12, 3)), (3, 1, (1, 15, 13, 4)), (2, 0, (1, 9, 14, 5)), (4, 1, (1, 12, 9, 2))],
)
def test_max_pool_with_indices_gradient_matches_torch(window, padding, shape):
    # The stride-2 gradient is assembled from the indices: with many ties (small integers) and
    # overlapping windows (3x3, 4x4) several windows send their gradient to the same pixel, where
    # it must add up; odd sizes leave the last row/column outside every window.
    rng = np.random.default_rng(6)
    x = rng.integers(0, 3, size=shape).astype(np.float32)
    tx = nchw(x).requires_grad_(True)
    ty, _ = F.max_pool2d(tx, window, 2, padding, return_indices=True)
    cot = rng.standard_normal(nhwc(ty).shape).astype(np.float32)
    (ty * nchw(cot)).sum().backward()
    (y, idx), vjp = jax.vjp(lambda a: pooling.max_pool_with_indices(a, window, 2, padding), jnp.asarray(x))
    (gx,) = vjp((jnp.asarray(cot), np.zeros(idx.shape, jax.dtypes.float0)))
    np.testing.assert_array_equal(np.asarray(y), nhwc(ty))
    np.testing.assert_allclose(np.asarray(gx), nhwc(tx.grad), rtol=1e-6, atol=1e-6)
    assert np.count_nonzero(nhwc(tx.grad)) < x.size  # pixels that no window chose get nothing


def test_max_pool_ties_take_first_maximum_and_padding_never_wins():
    # All-equal negative input: every window ties, and the -inf padding must not be chosen.
    x = np.full((1, 6, 6, 1), -3.0, np.float32)
    x[0, 2:4, 2:4, 0] = 1.0  # a 2x2 plateau shared by several overlapping windows
    _, idx = pooling.max_pool_with_indices(jnp.asarray(x), 3, 2, 1)
    _, tidx = F.max_pool2d(nchw(x), 3, 2, 1, return_indices=True)
    np.testing.assert_array_equal(np.asarray(idx), nhwc(tidx))
    assert np.asarray(idx)[0, 0, 0, 0] == 0  # first element of the window, not padding


@pytest.mark.parametrize(
    "window,stride,size",
    [
        (2, 2, (16, 24)),
        (2, 4, (16, 24)),
        (2, 8, (16, 24)),  # SBFI's MaxPool2d(2, stride)
        (2, 4, (17, 23)),
        (3, 3, (13, 11)),  # windows that end before the plane does
        (12, 12, (26, 25)),  # offsets past int8's range
        (3, 2, (13, 11)),
    ],
)  # overlapping windows (the select chain's own gradient)
def test_max_pool_and_its_gradient_match_torch_with_ties(window, stride, size):
    # Few distinct values (ReLU zeros are common): PyTorch sends a window's gradient to its
    # first maximum only.
    x = np.random.default_rng(2).integers(0, 3, size=(2, *size, 3)).astype(np.float32)
    tx = nchw(x).requires_grad_(True)
    ty = F.max_pool2d(tx, window, stride)
    cot = np.random.default_rng(3).standard_normal(nhwc(ty).shape).astype(np.float32)
    (ty * nchw(cot)).sum().backward()
    y, vjp = jax.vjp(lambda a: pooling.max_pool(a, window, stride), jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), nhwc(ty))
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(cot))[0]), nhwc(tx.grad))


@pytest.mark.parametrize("window,padding", [(3, 1), (2, 0)])
def test_max_unpool_and_its_gradient_match_torch_including_overlaps(window, padding):
    rng = np.random.default_rng(1)
    # Few distinct values: overlapping 3x3 windows often pick the same position, which
    # exercises the "last window in row-major order wins" rule.
    x = rng.integers(0, 3, size=(2, 16, 16, 4)).astype(np.float32)
    _, idx = F.max_pool2d(nchw(x), window, 2, padding, return_indices=True)
    values = torch.from_numpy(rng.standard_normal(idx.shape).astype(np.float32)).requires_grad_(True)
    expected = F.max_unpool2d(values, idx, kernel_size=2, stride=2)
    cot = rng.standard_normal(nhwc(expected).shape).astype(np.float32)
    (expected * nchw(cot)).sum().backward()
    # PyTorch's flat indices as the window offsets that max_pool_with_argmax returns.
    rows, cols = np.divmod(nhwc(idx), 16)
    pooled_rows = np.arange(8)[None, :, None, None] * 2 - padding
    pooled_cols = np.arange(8)[None, None, :, None] * 2 - padding
    argmax = (rows - pooled_rows) * window + (cols - pooled_cols)
    _, ours = pooling.max_pool_with_argmax(jnp.asarray(x), window, 2, padding)
    np.testing.assert_array_equal(np.asarray(ours), argmax)
    got, vjp = jax.vjp(
        lambda v: pooling.max_unpool_2x2(v, jnp.asarray(argmax, jnp.int32), window), jnp.asarray(nhwc(values))
    )
    assert got.shape == (2, 16, 16, 4)
    np.testing.assert_array_equal(np.asarray(got), nhwc(expected))
    # The backward is PyTorch's gather: each window takes the cotangent at its own argmax,
    # also the windows whose value another window overwrote.
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(cot))[0]), nhwc(values.grad))
    # The case under test really occurs: some positions are chosen by several windows.
    flat = idx.reshape(2, 4, -1).numpy()
    if window == 3:
        assert any(len(np.unique(f)) < f.size for f in flat.reshape(-1, flat.shape[-1]))


def test_max_unpool_rejects_unknown_window():
    with pytest.raises(ValueError, match="pool_window"):
        pooling.max_unpool_2x2(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1), jnp.int32), 4)


@pytest.mark.parametrize("factor", [2, 4, 8, 16, 32])
def test_upsample_bilinear_matches_torch(factor):
    x = np.random.default_rng(factor).standard_normal((2, 3, 5, 4)).astype(np.float32)
    expected = F.interpolate(nchw(x), scale_factor=factor, mode="bilinear", align_corners=False)
    got = resize.upsample_bilinear(jnp.asarray(x), factor)
    np.testing.assert_allclose(np.asarray(got), nhwc(expected), rtol=RTOL, atol=ATOL)


def _torch_bn(channels, seed):
    g = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.rand(channels, generator=g) - 0.5)
        bn.running_mean.copy_(torch.rand(channels, generator=g) - 0.5)
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return bn


def _bn_variables(bn):
    return {
        "params": {"scale": bn.weight.detach().numpy(), "bias": bn.bias.detach().numpy()},
        "batch_stats": {"mean": bn.running_mean.numpy().copy(), "var": bn.running_var.numpy().copy()},
    }


def test_batchnorm_eval_and_train_match_torch_including_running_stats():
    x = np.random.default_rng(2).standard_normal((3, 5, 7, 6)).astype(np.float32) * 2 + 1
    bn = _torch_bn(6, seed=0)
    variables = _bn_variables(bn)
    module = layers.BatchNorm()
    bn.eval()
    np.testing.assert_allclose(
        np.asarray(module.apply(variables, jnp.asarray(x), train=False)), nhwc(bn(nchw(x))), rtol=RTOL, atol=ATOL
    )
    bn.train()
    expected = nhwc(bn(nchw(x)))  # also updates bn's running statistics (momentum 0.1)
    got, updates = module.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(got), expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], bn.running_mean.numpy(), rtol=RTOL, atol=ATOL)
    # PyTorch keeps the unbiased batch variance in running_var.
    np.testing.assert_allclose(updates["batch_stats"]["var"], bn.running_var.numpy(), rtol=RTOL, atol=ATOL)


def test_conv_bn_relu_stack_matches_torch_sequential():
    torch.manual_seed(0)
    seq = torch.nn.Sequential(
        torch.nn.Conv2d(4, 4, 3, padding=1),
        _torch_bn(4, 1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3, padding=1),
        _torch_bn(6, 2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(6, 3, 3, padding=1),
    ).eval()
    params, stats = {}, {}
    for i, mod in enumerate(seq):
        if isinstance(mod, torch.nn.Conv2d):
            params[str(i)] = {"kernel": conv_kernel(mod.weight), "bias": mod.bias.detach().numpy()}
        elif isinstance(mod, torch.nn.BatchNorm2d):
            v = _bn_variables(mod)
            params[str(i)], stats[str(i)] = v["params"], v["batch_stats"]
    x = np.random.default_rng(3).standard_normal((2, 8, 6, 4)).astype(np.float32)
    stack = layers.ConvBNReLUStack((4, 6, 3), plain_last=True)
    got = stack.apply({"params": params, "batch_stats": stats}, jnp.asarray(x), train=False)
    np.testing.assert_allclose(np.asarray(got), nhwc(seq(nchw(x))), rtol=RTOL, atol=ATOL)


# --- Bridges: small PyTorch versions written from docs/design.md section 3, same weights. ---


def _conv(cin, cout, k, gen):
    conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.2)
    return conv


class TorchTFI(torch.nn.Module):
    def __init__(self, c, gen):
        super().__init__()
        self.transform = _conv(c, c // 2, 1, gen)
        self.conv1 = _conv(3 * (c // 2), c, 3, gen)
        self.bn1 = _torch_bn(c, 5).eval()

    def forward(self, g, l, e):
        x = torch.cat([self.transform(g), self.transform(l), self.transform(e)], 1)
        return torch.relu(self.bn1(self.conv1(x)))


class TorchSBFI(torch.nn.Module):
    def __init__(self, c, c_stem, stride, gen):
        super().__init__()
        self.stride = stride
        self.transform1 = _conv(c, c // 2, 1, gen)
        self.transform2 = _conv(c_stem, c // 2, 1, gen)
        self.conv1 = _conv(c, c, 3, gen)
        self.bn1 = _torch_bn(c, 6).eval()

    def forward(self, x, stem):
        s = F.max_pool2d(stem, 2, self.stride)
        y = torch.cat([self.transform1(x), self.transform2(s)], 1)
        return torch.relu(self.bn1(self.conv1(y))) + x


class TorchDBFI(torch.nn.Module):
    def __init__(self, c, c_deep, stride, gen):
        super().__init__()
        self.stride = stride
        self.transform1 = _conv(c, c // 2, 1, gen)
        self.transform2 = _conv(c_deep, c // 2, 1, gen)
        self.conv1 = _conv(c, c, 3, gen)
        self.bn1 = _torch_bn(c, 7).eval()
        self.conv2 = _conv(c, 3, 3, gen)

    def forward(self, x, deep):
        d = F.interpolate(self.transform2(deep), scale_factor=self.stride, mode="bilinear")
        y = torch.relu(self.bn1(self.conv1(torch.cat([self.transform1(x), d], 1)))) + x
        side = F.interpolate(self.conv2(y), scale_factor=32 // self.stride, mode="bilinear")
        return y, side


def _flax_variables(module: torch.nn.Module):
    """Converts a small torch module's state dict by the same rules as the weight import."""
    params, stats = {}, {}
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Conv2d):
            params[name] = {"kernel": conv_kernel(child.weight)}
        elif isinstance(child, torch.nn.BatchNorm2d):
            v = _bn_variables(child)
            params[name], stats[name] = v["params"], v["batch_stats"]
    return {"params": params, "batch_stats": stats}


def test_tfi_matches_torch():
    gen = torch.Generator().manual_seed(0)
    ref = TorchTFI(8, gen)
    g, l, e = (np.random.default_rng(i).standard_normal((2, 6, 4, 8)).astype(np.float32) for i in range(3))
    got = TFI(8).apply(_flax_variables(ref), g, l, e, train=False)
    np.testing.assert_allclose(np.asarray(got), nhwc(ref(nchw(g), nchw(l), nchw(e))), rtol=RTOL, atol=ATOL)


def test_sbfis_share_one_stem_pooling_and_match_torch():
    # The decoder's three sBFIs (strides 2, 4 and 8) on one stem feature: their outputs and the
    # stem's gradient equal PyTorch's, where each pools the stem with MaxPool2d(2, stride) and ours
    # share one stride-2 pooling (`pool_stem`). Half the stem values are zero (as after a ReLU), so
    # that ties decide which pixel of a window gets the gradient.
    rng = np.random.default_rng(0)
    stem = np.maximum(rng.standard_normal((1, 32, 48, 4)), 0).astype(np.float32)
    locals_ = [rng.standard_normal((1, 32 // s, 48 // s, 8)).astype(np.float32) for s in (2, 4, 8)]
    cots = [rng.standard_normal(x.shape).astype(np.float32) for x in locals_]
    refs = [TorchSBFI(8, 4, s, torch.Generator().manual_seed(s)) for s in (2, 4, 8)]
    tstem = nchw(stem).requires_grad_(True)
    touts = [ref(nchw(x), tstem) for ref, x in zip(refs, locals_)]
    sum((t * nchw(c)).sum() for t, c in zip(touts, cots)).backward()

    def forward(stem):
        pooled = pool_stem(stem)
        return [
            SBFI(8, s).apply(_flax_variables(ref), x, pooled, train=False)
            for s, ref, x in zip((2, 4, 8), refs, locals_)
        ]

    outs, vjp = jax.vjp(forward, jnp.asarray(stem))
    for got, want in zip(outs, touts):
        np.testing.assert_allclose(np.asarray(got), nhwc(want), rtol=RTOL, atol=ATOL)
    (gstem,) = vjp([jnp.asarray(c) for c in cots])
    np.testing.assert_allclose(np.asarray(gstem), nhwc(tstem.grad), rtol=RTOL, atol=ATOL)
    assert np.count_nonzero(nhwc(tstem.grad)) > 0


@pytest.mark.parametrize("stride", [4, 8, 16])
def test_dbfi_matches_torch(stride):
    gen = torch.Generator().manual_seed(stride)
    ref = TorchDBFI(8, 16, stride, gen)
    deep = np.random.default_rng(0).standard_normal((1, 2, 3, 16)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((1, 2 * stride, 3 * stride, 8)).astype(np.float32)
    (got, side) = DBFI(8, stride).apply(_flax_variables(ref), x, deep, train=False)
    exp, exp_side = ref(nchw(x), nchw(deep))
    np.testing.assert_allclose(np.asarray(got), nhwc(exp), rtol=RTOL, atol=ATOL)
    assert side.shape == (1, 64, 96, 3)
    np.testing.assert_allclose(np.asarray(side), nhwc(exp_side), rtol=RTOL, atol=ATOL)


_SAME_CONV_CASES = [
    (12, 8, 3, 4),  # small groups (3 -> 2) on CPU: fused multiply-adds, all taps at once
    (64, 16, 3, 4),  # small groups (16 -> 4): fused multiply-adds, a loop over the taps
    (8, 32, 3, 4),  # expanding small groups (2 -> 8): XLA forward, fused input gradient
    (64, 8, 3, 2),  # wide groups (32 -> 4): XLA forward, input gradient as a grouped conv
    (16, 20, 3, 1),  # enough output channels: XLA's kernel gradient of the padded input on CPU
    (3, 16, 7, 1),  # few input channels (the stems): the same
    (3, 48, 3, 1),  # the same, Swin-T's 3x3 stem
    (16, 3, 3, 1),  # few output channels (the heads): the stacked-cotangent kernel gradient
    (24, 1, 5, 1),  # the same, one output channel and a 5x5 kernel
    (16, 24, 1, 1),  # 1x1: a plain matmul
]


# Images of up to 16x16 pixels take the stacked-taps matmul, which is ungrouped only: the grouped
# cases run at the large size alone.
@pytest.mark.parametrize(
    "cin,cout,kernel,groups,hw",
    [(*case, hw) for hw in [(18, 17), (6, 5), (2, 2)] for case in _SAME_CONV_CASES if hw == (18, 17) or case[3] == 1],
)
def test_same_conv_and_its_gradients_match_torch(cin, cout, kernel, groups, hw):
    # The forward and backward passes written for XLA:CPU give PyTorch's, with odd shapes (17 and
    # 5 columns) so that the padded-grid row offsets of the kernel gradient are exercised. Images
    # of up to 16x16 pixels take the stacked-taps matmul, also with a kernel larger than the image.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, *hw, cin)).astype(np.float32)
    w = (rng.standard_normal((cout, cin // groups, kernel, kernel)) * 0.3).astype(np.float32)
    cot = rng.standard_normal((2, *hw, cout)).astype(np.float32)
    tx = nchw(x).requires_grad_(True)
    tw = torch.from_numpy(w).requires_grad_(True)
    ty = F.conv2d(tx, tw, padding=kernel // 2, groups=groups)
    (ty * nchw(cot)).sum().backward()
    conv = layers.conv2d(cout, kernel, use_bias=False, groups=groups, name="c")
    y, vjp = jax.vjp(
        lambda a, b: conv.apply({"params": {"kernel": b}}, a), jnp.asarray(x), jnp.asarray(conv_kernel(tw))
    )
    gx, gw = vjp(jnp.asarray(cot))
    assert_close_to_scale(y, nhwc(ty))
    assert_close_to_scale(gx, nhwc(tx.grad))
    assert_close_to_scale(gw, conv_kernel(tw.grad))
    if kernel > 1:  # the bare function too
        _, vjp = jax.vjp(lambda a, b: conv_ops.same_conv(a, b, groups), jnp.asarray(x), jnp.asarray(conv_kernel(tw)))
        assert_close_to_scale(vjp(jnp.asarray(cot))[1], conv_kernel(tw.grad))


def assert_close_to_scale(actual, desired):
    """float32 agreement for sums of hundreds of products: 1e-5 relative to the array's largest value."""
    desired = np.asarray(desired)
    np.testing.assert_allclose(
        np.asarray(actual), desired, rtol=RTOL, atol=ATOL * max(1.0, float(np.abs(desired).max()))
    )


@pytest.mark.parametrize("cin,cout,groups", [(24, 20, 1), (64, 8, 2), (32, 64, 8)])
def test_cpu_compiled_conv_and_its_gradients_match_torch(cin, cout, groups):
    # Training, evaluation and inference programs compile on the CPU with XLA's own convolutions
    # (`compile_options`), not YNNPACK's (which takes convolutions with more than 16 channels);
    # the forward pass and both gradients still give PyTorch's, plain and grouped.
    from p3m_jax.common.compile_options import compiler_options

    options = compiler_options("cpu")
    assert options is not None
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 18, 17, cin)).astype(np.float32)
    w = (rng.standard_normal((cout, cin // groups, 3, 3)) * 0.3).astype(np.float32)
    cot = rng.standard_normal((2, 18, 17, cout)).astype(np.float32)
    tx = nchw(x).requires_grad_(True)
    tw = torch.from_numpy(w).requires_grad_(True)
    ty = F.conv2d(tx, tw, padding=1, groups=groups)
    (ty * nchw(cot)).sum().backward()

    def forward_and_grads(a, b, g):
        y, vjp = jax.vjp(lambda a, b: conv_ops.same_conv(a, b, groups), a, b)
        return (y, *vjp(g))

    y, gx, gw = jax.jit(forward_and_grads, compiler_options=options)(
        jnp.asarray(x), jnp.asarray(conv_kernel(tw)), jnp.asarray(cot)
    )
    assert_close_to_scale(y, nhwc(ty))
    assert_close_to_scale(gx, nhwc(tx.grad))
    assert_close_to_scale(gw, conv_kernel(tw.grad))


@pytest.mark.parametrize("kernel,cin,cout", [(3, 16, 20), (5, 16, 20), (7, 3, 16), (3, 64, 3)])
def test_cpu_kernel_grads_match_xlas_convolution_gradient(kernel, cin, cout):
    # The CPU kernel gradients (XLA's on the input padded beforehand; the stacked shifted cotangent
    # for few output channels) equal XLA's gradient of the padded convolution, on odd sizes.
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 13, 11, cin)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, 13, 11, cout)), jnp.float32)
    kernel_shape = (kernel, kernel, cin, cout)
    _, vjp = jax.vjp(lambda b: conv_xla.lax_same_conv(x, b, 1), jnp.zeros(kernel_shape))
    (want,) = vjp(g)
    kernel_grad = (
        conv_cpu._stacked_cotangent_kernel_grad
        if cout < conv_cpu._MIN_OUTPUT_CHANNELS_FOR_XLA_KERNEL_GRAD
        else conv_cpu._padded_input_kernel_grad
    )
    got = kernel_grad(x, g, kernel_shape, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "kernel_grad,cin,cout",
    [
        (conv_cpu._padded_input_kernel_grad, 16, 16),
        (conv_cpu._stacked_cotangent_kernel_grad, 16, 3),
        (conv_cpu._padded_input_kernel_grad, 3, 16),
    ],
)
def test_kernel_grads_in_bfloat16_accumulate_in_float32(kernel_grad, cin, cout):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((1, 32, 32, cin)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((1, 32, 32, cout)), jnp.bfloat16)
    kernel = jnp.zeros((3, 3, cin, cout), jnp.bfloat16)
    _, vjp = jax.vjp(lambda b: conv_xla.lax_same_conv(x.astype(jnp.float32), b, 1), kernel.astype(jnp.float32))
    (want,) = vjp(g.astype(jnp.float32))
    got = kernel_grad(x, g, kernel.shape, kernel.dtype)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=1e-2, atol=0.3)
