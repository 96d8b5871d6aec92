"""`load_pretrained`: a `Predictor` from any of the weights p3m-jax reads (its own model checkpoint,
a training workdir, an authors' ``.pth``)."""

from __future__ import annotations

import os

import jax.numpy as jnp

from p3m_jax.common import storage
from p3m_jax.inference.predictor import Predictor
from p3m_jax.models import ARCHITECTURES
from p3m_jax.weights import model_checkpoint
from p3m_jax.weights.initialize import variables_from_torch
from p3m_jax.weights.workdir_checkpoints import is_training_workdir, read_training_workdir


# What `load_pretrained` raises for weights that are missing (FileNotFoundError), foreign or corrupt
# (ValueError, including `torch_import.CheckpointImportError`) or a .pth without PyTorch (ImportError):
# the command-line tools report these as one line.
CHECKPOINT_ERRORS = (FileNotFoundError, ValueError, ImportError)


def load_pretrained(
    path: str | os.PathLike, arch: str | None = None, *, dtype=jnp.float32, verbose: bool = False, ema: bool = False
) -> Predictor:
    """Loads trained P3M-Net weights for inference.

    Args:
      path: a p3m-jax model checkpoint directory (written by ``python -m p3m_jax.convert`` or
        `Predictor.save`), a training workdir of ``python -m p3m_jax.main`` (its best checkpoint
        by validation SAD, or the latest when none was evaluated), or an authors' PyTorch ``.pth`` (``{'state_dict': ...}`` or a bare
        state dict; reading it needs PyTorch).
      arch: "resnet34", "swin_t" or "vitae_s". Required for a ``.pth``; for a p3m-jax
        checkpoint it is read from the checkpoint (and checked if given).
      dtype: compute dtype, ``jnp.float32`` (default) or ``jnp.bfloat16``.
      verbose: print what was loaded.
      ema: a training workdir's EMA of the weights (trained with ``config.ema_decay`` > 0) instead
        of the raw weights.

    Returns:
      A `Predictor`: ``predictor.forward(x)`` gives the six outputs as numpy arrays.
    """
    if arch is not None and arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    resolved = storage.resolve(path)
    path = os.fspath(resolved)
    storage.check_bucket(path)
    with storage.reported(path, "reading weights"):
        is_dir, exists = resolved.is_dir(), resolved.exists()
    if is_dir and not model_checkpoint.is_model_checkpoint(path) and is_training_workdir(path):
        saved_arch, options, variables, step = read_training_workdir(path, arch, ema=ema)
        source = f"training workdir {path}, step {step}" + (", EMA weights" if ema else "")
        return Predictor(saved_arch, variables, dtype=dtype, options=options, source=source)
    if ema:
        raise ValueError(f"--ema needs a training workdir (the EMA is kept in its checkpoints); {path} is not one")
    if is_dir:
        saved_arch, options, variables = model_checkpoint.load_model_checkpoint(path)
        if arch is not None and arch != saved_arch:
            raise ValueError(f"{path} holds a {saved_arch} model, not {arch}")
        return Predictor(saved_arch, variables, dtype=dtype, options=options, source=f"model checkpoint {path}")
    if not exists:
        raise FileNotFoundError(f"no checkpoint at {path}")
    if arch is None:
        raise ValueError(f"{path} looks like a PyTorch checkpoint: pass arch= (one of {sorted(ARCHITECTURES)})")
    variables, _ = variables_from_torch(path, arch, verbose=verbose)
    return Predictor(arch, variables, dtype=dtype, source=f"PyTorch checkpoint {path}")
