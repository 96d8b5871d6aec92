"""Inference: the `Predictor` (compiled forward passes), the paper's RESIZE / HYBRID strategies, and
`load_pretrained` for every kind of weights p3m-jax reads."""

from p3m_jax.inference.loading import CHECKPOINT_ERRORS, load_pretrained
from p3m_jax.inference.predictor import Predictor

__all__ = ["CHECKPOINT_ERRORS", "Predictor", "load_pretrained"]
