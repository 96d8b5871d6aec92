"""ResNet-34-mp: the ResNet-34 encoder of P3M-Net with every stride replaced by max-pooling.

torchvision's ResNet-34 shapes, but the stem convolution and all BasicBlocks have stride 1;
five 3x3/stride 2/padding 1 max-pools (returning indices for the local decoder's unpooling)
do all the downsampling:

    conv1 7x7 + BN + ReLU -> e0 (H)
    mp0 -> e0p (H/2);  mp1 -> layer1 -> e1 (H/4);  mp2 -> layer2 -> e2 (H/8)
    mp3 -> layer3 -> e3 (H/16);  mp4 -> layer4 -> e4 (H/32)

The ImageNet classifier head (``fc``, 512 -> 1000) of the pretrained backbone is part of the
authors' P3M-Net state dict and of its parameter count (39,478,060); it is created at
initialization so checkpoints round-trip, but never computed when matting.
"""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from p3m_jax.models.decoder import EncoderOutput
from p3m_jax.models.layers import BatchNorm, Dtype, conv2d, torch_conv_init
from p3m_jax.ops.pooling import max_pool_with_argmax

RESNET34_LAYERS = (3, 4, 6, 3)
RESNET34_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Stride-1 ResNet BasicBlock; a 1x1 conv + BN projection (``downsample``) when widening."""

    planes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        identity = x
        out = conv2d(self.planes, 3, use_bias=False, name="conv1", dtype=self.dtype)(x)
        out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, train))
        out = conv2d(self.planes, 3, use_bias=False, name="conv2", dtype=self.dtype)(out)
        out = BatchNorm(dtype=self.dtype, name="bn2")(out, train)
        if x.shape[-1] != self.planes:
            # Named like torchvision's nn.Sequential(conv1x1, BatchNorm2d) "downsample".
            identity = _Projection(self.planes, dtype=self.dtype, name="downsample")(x, train)
        return nn.relu(out + identity)


class _Projection(nn.Module):
    planes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = conv2d(self.planes, 1, use_bias=False, name="0", dtype=self.dtype)(x)
        return BatchNorm(dtype=self.dtype, name="1")(x, train)


class ResLayer(nn.Module):
    """``num_blocks`` BasicBlocks, named "0", "1", ... like torchvision's ``layerN``."""

    planes: int
    num_blocks: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        for i in range(self.num_blocks):
            x = BasicBlock(self.planes, dtype=self.dtype, name=str(i))(x, train)
        return x


class ResNet34MP(nn.Module):
    """The ResNet-34-mp encoder; returns an `EncoderOutput`."""

    dtype: Dtype = jnp.float32
    num_classes: int = 1000
    remat: bool = False  # rematerialise each layerN in the backward pass (same parameter tree)

    @nn.compact
    def __call__(self, x, train: bool) -> EncoderOutput:
        # nn.remat recomputes a stage's activations in the backward pass instead of storing
        # them; ``train`` (argument 2, counting self) must stay a Python bool.
        layer_cls = nn.remat(ResLayer, static_argnums=(2,)) if self.remat else ResLayer
        x = x.astype(self.dtype)
        e0 = conv2d(64, 7, use_bias=False, name="conv1", dtype=self.dtype)(x)
        e0 = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(e0, train))
        e0p, id0 = max_pool_with_argmax(e0, 3, 2, 1)
        e1p, id1 = max_pool_with_argmax(e0p, 3, 2, 1)
        feats = [e0, e0p]
        indices = [id0, id1]
        h = e1p
        for i, (planes, blocks) in enumerate(zip(RESNET34_WIDTHS, RESNET34_LAYERS)):
            h = layer_cls(planes, blocks, dtype=self.dtype, name=f"layer{i + 1}")(h, train)
            if i < 3:
                feats.append(h)
                h, ind = max_pool_with_argmax(h, 3, 2, 1)
                indices.append(ind)
        if self.is_initializing() and self.num_classes:
            # Create the ImageNet head's parameters only (see module docstring).
            nn.Dense(
                self.num_classes,
                dtype=self.dtype,
                kernel_init=torch_conv_init,
                bias_init=nn.initializers.zeros,
                name="fc",
            )(jnp.mean(h, axis=(1, 2)))
        return EncoderOutput(deep=h, features=tuple(feats), indices=tuple(indices))
