"""The two-branch P3M decoder shared by the three encoders, and the global/local fusion.

The semantic (global) branch predicts a 3-class trimap-like map (background, transition,
foreground) from the deepest feature, upsampling 2x after every block; the detail (local)
branch predicts alpha, max-unpooling with the encoder's pooling indices after every block.
TFI, sBFI and dBFI (see `bridges`) connect them. The three published variants differ only in
their channel widths, in where a block changes width, and in whether the global branch ends
with an extra 3x3 convolution: `DecoderSpec` captures exactly that.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from p3m_jax.models.bridges import DBFI, SBFI, TFI, pool_stem
from p3m_jax.models.layers import ConvBNReLUStack, Dtype, conv2d
from p3m_jax.ops.pooling import max_unpool_2x2
from p3m_jax.ops.resize import upsample_bilinear

OUTPUT_NAMES = ("global", "local", "fusion", "side2", "side1", "side0")


class EncoderOutput(NamedTuple):
    """What every encoder hands to the decoder (all NHWC, finest first).

    deep: the deepest feature, at 1/32 of the input size.
    features: 5 skip features at 1, 1/2, 1/4, 1/8, 1/16 of the input size; ``features[0]`` is
      the stem feature used by sBFI.
    indices: 5 max-pooling argmax maps (`max_pool_with_argmax`: the winner's offset inside its
      window, int32); ``indices[k]`` maps level k+1 (size 1/2^(k+1)) back to level k, for
      `max_unpool_2x2`.
    """

    deep: jax.Array
    features: tuple
    indices: tuple


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """Shape of the decoder for one encoder.

    widths: (w4, w3, w2, w1, w0, w_final): channels of the deepest feature, of the four decoder
      levels from coarse to fine, and of the last block.
    widen_on: "last" if a block changes width on its last convolution (ResNet-34 variant),
      "first" if on its first one (transformer variants).
    global_head_conv: whether the global branch ends with an extra conv3x3 -> 3 after its last
      upsampling (transformer variants) instead of emitting 3 channels from its last block.
    pool_window: window of the encoder's stride-2 poolings whose indices the local branch
      unpools with (3 for ResNet-34-mp's 3x3/pad 1 pools, 2 for the transformers' 2x2 pools).
    """

    widths: tuple[int, int, int, int, int, int]
    widen_on: str
    global_head_conv: bool
    pool_window: int

    def block_widths(self, level: int, branch: str) -> tuple[int, ...]:
        """Output channels of each convolution of decoder block ``level`` (4..0)."""
        w4, w3, w2, w1, w0, wf = self.widths
        cin = (w4, w3, w2, w1, w0)[4 - level]
        if level > 0:
            cout = (w3, w2, w1, w0)[4 - level]
            n = 3
        elif branch == "global":
            cout = wf if self.global_head_conv else 3
            n = 3
        else:
            cout = wf
            n = 2
        if self.widen_on == "last":
            return (cin,) * (n - 1) + (cout,)
        return (cout,) * n


RESNET34_DECODER = DecoderSpec((512, 256, 128, 64, 64, 64), "last", False, 3)
SWIN_T_DECODER = DecoderSpec((768, 384, 192, 96, 96, 48), "first", True, 2)
VITAE_S_DECODER = DecoderSpec((512, 256, 128, 64, 64, 32), "first", True, 2)


def fuse_global_local(global_logits: jax.Array, local_alpha: jax.Array) -> jax.Array:
    """Fusion: local alpha in the predicted transition region, 1 in the foreground, else 0.

    The class decision is an argmax, so no gradient reaches the global branch through it.
    """
    cls = jnp.argmax(global_logits, axis=-1)[..., None]
    transition = (cls == 1).astype(local_alpha.dtype)
    foreground = (cls == 2).astype(local_alpha.dtype)
    return local_alpha * transition + foreground


# How the decoder's blocks and bridges are rematerialised in the backward pass: each keeps only its
# inputs and, with "convs", its convolution outputs (BatchNorm, ReLU and resizing are recomputed).
DECODER_REMAT_POLICIES = {
    "none": None,
    "convs": jax.checkpoint_policies.dots_saveable,
    "nothing": jax.checkpoint_policies.nothing_saveable,
}


def _remat(cls, policy_name: str, train_argnum: int):
    """``cls`` rematerialised with the named policy (the same class, so the same parameter tree,
    when the policy is "none"); ``train_argnum`` counts ``self``."""
    if DECODER_REMAT_POLICIES[policy_name] is None:
        return cls
    return nn.remat(cls, static_argnums=(train_argnum,), policy=DECODER_REMAT_POLICIES[policy_name])


class P3MDecoder(nn.Module):
    """Global + local decoder with TFI/sBFI/dBFI bridges; returns the six P3M outputs.

    ``remat``: a key of `DECODER_REMAT_POLICIES`; the parameter tree does not depend on it."""

    spec: DecoderSpec
    dtype: Dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, enc: EncoderOutput, train: bool) -> dict[str, jax.Array]:
        spec = self.spec
        w4, w3, w2, w1, w0, _ = spec.widths
        x = enc.deep
        feats, idx = enc.features, enc.indices
        pooled_stem = pool_stem(feats[0])  # one pooling for the three sBFIs
        stack_cls = _remat(ConvBNReLUStack, self.remat, 2)
        tfi_cls, sbfi_cls, dbfi_cls = (_remat(c, self.remat, n) for c, n in ((TFI, 4), (SBFI, 3), (DBFI, 3)))

        def block(level, branch, inp):
            return stack_cls(
                spec.block_widths(level, branch),
                plain_last=(level == 0 and branch == "global"),
                dtype=self.dtype,
                name=f"decoder{level}_{branch[0]}",
            )(inp, train)

        def unpool(v, k):
            return max_unpool_2x2(v, idx[k], spec.pool_window)

        # Global (semantic) branch.
        d4_g = upsample_bilinear(block(4, "global", x), 2)
        d3_g = upsample_bilinear(block(3, "global", d4_g), 2)
        d2_g, side2 = dbfi_cls(w2, 4, dtype=self.dtype, name="dbfi_2")(d3_g, x, train)
        d2_g = upsample_bilinear(block(2, "global", d2_g), 2)
        d1_g, side1 = dbfi_cls(w1, 8, dtype=self.dtype, name="dbfi_1")(d2_g, x, train)
        d1_g = upsample_bilinear(block(1, "global", d1_g), 2)
        d0_g, side0 = dbfi_cls(w0, 16, dtype=self.dtype, name="dbfi_0")(d1_g, x, train)
        global_logits = upsample_bilinear(block(0, "global", d0_g), 2)
        if spec.global_head_conv:
            global_logits = conv2d(3, 3, use_bias=True, name="decoder_final_g", dtype=self.dtype)(global_logits)

        # Local (detail) branch.
        d4_l = unpool(block(4, "local", x), 4)
        d3_l = tfi_cls(w3, dtype=self.dtype, name="tfi_3")(d4_g, d4_l, feats[4], train)
        d3_l = unpool(block(3, "local", d3_l), 3)
        d2_l = tfi_cls(w2, dtype=self.dtype, name="tfi_2")(d3_g, d3_l, feats[3], train)
        d2_l = sbfi_cls(w2, 8, dtype=self.dtype, name="sbfi_2")(d2_l, pooled_stem, train)
        d2_l = unpool(block(2, "local", d2_l), 2)
        d1_l = tfi_cls(w1, dtype=self.dtype, name="tfi_1")(d2_g, d2_l, feats[2], train)
        d1_l = sbfi_cls(w1, 4, dtype=self.dtype, name="sbfi_1")(d1_l, pooled_stem, train)
        d1_l = unpool(block(1, "local", d1_l), 1)
        d0_l = tfi_cls(w0, dtype=self.dtype, name="tfi_0")(d1_g, d1_l, feats[1], train)
        d0_l = sbfi_cls(w0, 2, dtype=self.dtype, name="sbfi_0")(d0_l, pooled_stem, train)
        d0_l = unpool(block(0, "local", d0_l), 0)
        local_logit = conv2d(1, 3, use_bias=True, name="decoder_final_l", dtype=self.dtype)(d0_l)

        # Outputs leave the model in float32 whatever the compute dtype (losses and metrics
        # are computed in float32).
        global_logits = global_logits.astype(jnp.float32)
        local_alpha = jax.nn.sigmoid(local_logit.astype(jnp.float32))
        return {
            "global": global_logits,
            "local": local_alpha,
            "fusion": fuse_global_local(global_logits, local_alpha),
            "side2": side2.astype(jnp.float32),
            "side1": side1.astype(jnp.float32),
            "side0": side0.astype(jnp.float32),
        }
