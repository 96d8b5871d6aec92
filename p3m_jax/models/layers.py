"""Flax layers with PyTorch's semantics: convolution modules, BatchNorm, conv-BN-ReLU stacks.

Everything here is NHWC. The layers reproduce what the authors' PyTorch model computes (so the
released weights give the same outputs); the array kernels under them are in `p3m_jax.ops`.

Conventions shared by the whole `models` package:
- Parameter and submodule names mirror the attribute names of the authors' PyTorch modules
  (``conv1``, ``bn1``, ``decoder4_g``/``0``...), so that importing a PyTorch state dict is a
  mechanical renaming (see `p3m_jax.weights.torch_import`).
- ``dtype`` is the compute dtype (float32 or bfloat16); parameters are always float32.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from p3m_jax.ops.conv import flax_conv_general_dilated

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
        conv_general_dilated=flax_conv_general_dilated,
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
