"""p3m-jax: P3M-Net privacy-preserving portrait matting in JAX/Flax.

Public API:
  build_model(arch, **options)   -> flax.linen Module (arch: "resnet34", "swin_t", "vitae_s")
  load_pretrained(path, arch)    -> Predictor with .forward(x) -> dict of the six outputs
"""

from p3m_jax.models import IMAGENET_MEAN, IMAGENET_STD, OUTPUT_NAMES, build_model, init_variables
from p3m_jax.inference import Predictor, load_pretrained

__all__ = [
    "build_model",
    "init_variables",
    "load_pretrained",
    "Predictor",
    "OUTPUT_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
__version__ = "0.1.0"
