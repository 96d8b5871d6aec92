"""Weights: the authors' PyTorch checkpoints and backbones imported, p3m-jax's own model checkpoint
format, fresh initialisation, and reading the model out of a training workdir."""
