"""p3m-jax: P3M-Net privacy-preserving portrait matting in JAX/Flax.

Public API:
  build_model(arch, **options)   -> flax.linen Module (arch: "resnet34", "swin_t", "vitae_s")
  load_pretrained(path, arch)    -> Predictor with .forward(x) -> dict of the six outputs

The names load on first use, so that importing a light module of the package (``p3m_jax.common``,
the TFDS builder's worker processes, a command's ``--help``) does not import JAX.
"""

__version__ = "0.2.0"

_MODELS = ("build_model", "init_variables", "OUTPUT_NAMES", "IMAGENET_MEAN", "IMAGENET_STD")
_INFERENCE = ("load_pretrained", "Predictor")
__all__ = [*_MODELS, *_INFERENCE]


def __getattr__(name: str):
    if name in _MODELS:
        from p3m_jax import models  # pylint: disable=import-outside-toplevel

        return getattr(models, name)
    if name in _INFERENCE:
        from p3m_jax import inference  # pylint: disable=import-outside-toplevel

        return getattr(inference, name)
    raise AttributeError(f"module 'p3m_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
