"""P3M-Net: an encoder, the shared two-branch decoder, and `build_model`."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from p3m_jax.common.constants import IMAGENET_MEAN, IMAGENET_STD
from p3m_jax.models.fcp import apply_fcp
from p3m_jax.models.decoder import (
    OUTPUT_NAMES,
    RESNET34_DECODER,
    SWIN_T_DECODER,
    VITAE_S_DECODER,
    DecoderSpec,
    P3MDecoder,
)
from p3m_jax.models.layers import Dtype
from p3m_jax.models.resnet import ResNet34MP
from p3m_jax.models.swin import SwinTStemPooling
from p3m_jax.models.vitae import ViTAESmall
from p3m_jax.ops.normalize import normalize_uint8

# arch name -> (encoder class, decoder spec).
ARCHITECTURES: dict[str, tuple[Callable[..., nn.Module], DecoderSpec]] = {
    "resnet34": (ResNet34MP, RESNET34_DECODER),
    "swin_t": (SwinTStemPooling, SWIN_T_DECODER),
    "vitae_s": (ViTAESmall, VITAE_S_DECODER),
}


class P3MNet(nn.Module):
    """P3M-Net for NHWC float inputs (ImageNet-normalized RGB, sides multiples of 32).

    Returns a dict with the six outputs, all float32 at the input resolution:
    ``global`` (N, H, W, 3) logits of background/transition/foreground, ``local`` (N, H, W, 1)
    sigmoid alpha, ``fusion`` (N, H, W, 1) the fused alpha, ``side2``/``side1``/``side0``
    (N, H, W, 3) the dBFI side logits.
    """

    encoder: nn.Module
    decoder_spec: DecoderSpec
    dtype: Dtype = jnp.float32
    decoder_remat: str = "none"  # a key of `DECODER_REMAT_POLICIES`

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, fcp: dict[str, Any] | None = None) -> dict[str, jax.Array]:
        """``fcp``: optional P3M-CP feature-level copy and paste inputs (keys ``source_image``,
        ``mask``, ``apply``, ``layers``; see `p3m_jax.models.fcp.apply_fcp`)."""
        check_input_shape(x.shape)
        features = self.encoder(x, train)
        if fcp is not None:
            features = apply_fcp(self, self.encoder, features, fcp, train)
        return P3MDecoder(self.decoder_spec, dtype=self.dtype, remat=self.decoder_remat, name="decoder")(
            features, train
        )


def check_input_shape(shape) -> None:
    """Raises ValueError unless ``shape`` is (N, H, W, 3) with H and W multiples of 32."""
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"P3M-Net expects an NHWC batch of RGB images (N, H, W, 3); got shape {tuple(shape)}")
    n, h, w, _ = shape
    if h % 32 or w % 32 or h == 0 or w == 0:
        raise ValueError(
            f"P3M-Net needs height and width that are positive multiples of 32 "
            f"(five 2x poolings); got {h}x{w}. Resize or pad the image first."
        )


# Rematerialisation (recomputing activations in the backward pass instead of keeping them), by what it
# covers: (encoder stages, decoder policy). None of them changes the parameter tree or the maths.
REMAT_POLICIES = {
    "none": (False, "none"),
    "encoder": (True, "none"),  # each encoder stage keeps only its input
    "decoder": (False, "convs"),  # decoder blocks and bridges keep their inputs and convolution outputs
    "full": (True, "nothing"),  # both, the decoder keeping only block inputs
}


def remat_policy(value: Any) -> str:
    """``config.remat``, checked to be a key of `REMAT_POLICIES`."""
    if not isinstance(value, str) or value not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {value!r}; expected one of {list(REMAT_POLICIES)}")
    return value


def build_model(arch: str, *, dtype: Dtype = jnp.float32, remat: Any = "none", **encoder_options: Any) -> P3MNet:
    """Builds an uninitialized P3M-Net.

    Args:
      arch: "resnet34", "swin_t" or "vitae_s".
      dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``); parameters stay float32.
      remat: a key of `REMAT_POLICIES`.
      **encoder_options: passed to the encoder's constructor.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    encoder_remat, decoder_remat = REMAT_POLICIES[remat_policy(remat)]
    encoder_cls, spec = ARCHITECTURES[arch]
    encoder = encoder_cls(dtype=dtype, name="encoder", remat=encoder_remat, **encoder_options)
    return P3MNet(encoder=encoder, decoder_spec=spec, dtype=dtype, decoder_remat=decoder_remat)


def init_variables(model: P3MNet, rng: jax.Array, image_size: tuple[int, int] = (64, 64)):
    """Initializes ``model``'s variables (params, batch_stats, ...) with a dummy batch.

    The variables do not depend on the image size except for architectures that say so.
    """
    h, w = image_size
    return model.init(rng, jnp.zeros((1, h, w, 3), jnp.float32), train=False)


__all__ = [
    "P3MNet",
    "build_model",
    "remat_policy",
    "REMAT_POLICIES",
    "normalize_uint8",
    "init_variables",
    "check_input_shape",
    "ARCHITECTURES",
    "OUTPUT_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
