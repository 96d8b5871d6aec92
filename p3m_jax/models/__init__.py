"""Flax (linen) modules of P3M-Net: layers, bridges, decoder, and one file per encoder."""

from p3m_jax.models.decoder import EncoderOutput, DecoderSpec, P3MDecoder, OUTPUT_NAMES
from p3m_jax.models.p3mnet import (
    ARCHITECTURES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    P3MNet,
    REMAT_POLICIES,
    build_model,
    check_input_shape,
    init_variables,
    normalize_uint8,
    remat_policy,
)

__all__ = [
    "ARCHITECTURES",
    "DecoderSpec",
    "EncoderOutput",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OUTPUT_NAMES",
    "P3MDecoder",
    "P3MNet",
    "REMAT_POLICIES",
    "build_model",
    "check_input_shape",
    "init_variables",
    "normalize_uint8",
    "remat_policy",
]
