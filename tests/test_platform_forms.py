"""The accelerator forms of the ops that have a CPU form (`ops.platform.by_platform`): the same values and
gradients as the CPU forms, and the platform a program is lowered for decides which form it holds."""

import jax
import jax.numpy as jnp
import numpy as np

from p3m_jax.models import attention
from p3m_jax.ops import conv_cpu, conv_xla, platform


def _grads(fn, *args):
    return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=tuple(range(len(args))))(*args)


def _assert_same(got, want, atol):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=1e-5)


def test_layer_norm_forms_agree():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 9, 24)) * 3 + 40, jnp.float32)
    scale, bias = (jnp.asarray(rng.normal(size=24), jnp.float32) for _ in range(2))
    cpu = lambda *a: attention._layer_norm(*a, 1e-6)  # noqa: E731
    standard = lambda *a: attention._standard_layer_norm(*a, 1e-6)  # noqa: E731
    _assert_same(standard(x, scale, bias), cpu(x, scale, bias), 1e-5)
    _assert_same(_grads(standard, x, scale, bias), _grads(cpu, x, scale, bias), 1e-4)


def test_attention_forms_agree():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 37, 3, 8)), jnp.float32) for _ in range(3))
    chunked = lambda q, k, v: attention._chunked_attention(q, k, v, max_logits_per_chunk=2 * 3 * 37 * 10)  # noqa: E731
    _assert_same(jax.nn.dot_product_attention(q, k, v), chunked(q, k, v), 1e-5)
    _assert_same(_grads(jax.nn.dot_product_attention, q, k, v), _grads(chunked, q, k, v), 1e-4)


def test_conv_forms_agree():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 12, 12, 8)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)
    _assert_same(conv_xla.lax_same_conv(x, kernel, 2), conv_cpu.cpu_same_conv(x, kernel, groups=2), 1e-4)
    g = jnp.asarray(rng.normal(size=(2, 12, 12, 8)), jnp.float32)
    _assert_same(conv_xla.lax_same_conv_vjp(2, x, kernel, g), conv_cpu.cpu_same_conv_vjp(2, x, kernel, g), 1e-3)


def _lowered_text(fn, platform, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def test_lowering_platform_picks_the_form():
    """Lowered for the CPU, global attention over many logits runs in query chunks (a loop); lowered for
    a TPU or a GPU, as one `dot_product_attention`, with no loop; an exported (portable) program keeps
    the chunks on every platform."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 64, 2, 8)), jnp.float32) for _ in range(3))

    def loss(q, k, v):
        return jnp.sum(attention.global_attention(q, k, v, max_logits_per_chunk=2 * 64 * 16) ** 2)

    step = jax.grad(loss, argnums=(0, 1, 2))
    assert "stablehlo.while" in _lowered_text(step, "cpu", q, k, v)
    assert "stablehlo.while" not in _lowered_text(step, "tpu", q, k, v)
    assert "stablehlo.while" not in _lowered_text(step, "cuda", q, k, v)
    with platform.portable_program():  # a new function: jit's trace cache does not see the switch
        portable_step = jax.grad(lambda q, k, v: loss(q, k, v), argnums=(0, 1, 2))
        assert "stablehlo.while" in _lowered_text(portable_step, "tpu", q, k, v)
