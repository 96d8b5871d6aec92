"""Inference-ready P3M-Net: `load_pretrained` and the `Predictor` it returns."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from p3m_jax import checkpoints
from p3m_jax.models import ARCHITECTURES, build_model, check_input_shape, init_variables
from p3m_jax.weights import torch_import


def init_key(seed: int) -> jax.Array:
    """PRNG key for weight initialization.

    The "rbg" generator compiles 2-3x faster than the default threefry on XLA:CPU, where
    compiling the ~400 random initializers of a P3M-Net otherwise dominates start-up time.
    """
    return jax.random.key(seed, impl="rbg")


def _is_abstract(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


class Predictor:
    """A P3M-Net with its variables, run in eval mode (BatchNorm running statistics).

    ``forward`` is jitted; XLA compiles once per input shape and reuses it afterwards.
    """

    def __init__(self, arch: str, variables: Any, *, dtype=jnp.float32,
                 options: dict | None = None):
        self.arch = arch
        self.options = dict(options or {})
        self.dtype = dtype
        self.model = build_model(arch, dtype=dtype, **self.options)
        self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
        self.apply_fn = jax.jit(lambda v, x: self.model.apply(v, x, train=False))

    @classmethod
    def random(cls, arch: str, seed: int = 0, *, dtype=jnp.float32, **options) -> "Predictor":
        """A predictor with freshly initialized (untrained) weights, for tests and benchmarks."""
        model = build_model(arch, dtype=dtype, **options)
        variables = jax.jit(lambda r: init_variables(model, r))(init_key(seed))
        return cls(arch, variables, dtype=dtype, options=options)

    def forward(self, x) -> dict[str, np.ndarray]:
        """Runs the network on a batch.

        Args:
          x: float32 (N, H, W, 3), RGB already ImageNet-normalized, H and W multiples of 32.

        Returns:
          The six raw outputs as numpy float32 arrays: ``global`` (N, H, W, 3) logits,
          ``local`` and ``fusion`` (N, H, W, 1) alpha, ``side2``/``side1``/``side0`` logits.
        """
        x = np.asarray(x, dtype=np.float32)
        check_input_shape(x.shape)
        out = self.apply_fn(self.variables, x)
        return {k: np.asarray(v) for k, v in out.items()}

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> str:
        """Writes the variables as a p3m-jax model checkpoint (see `p3m_jax.checkpoints`)."""
        return checkpoints.save_model_checkpoint(path, self.arch, self.variables,
                                                 options=self.options, overwrite=overwrite)


def variables_from_torch(path: str | os.PathLike, arch: str, *, backbone_only: bool = False,
                         options: dict | None = None, seed: int = 0, verbose: bool = False):
    """Reads an authors' ``.pth`` and converts it for ``arch``; returns ``(variables, report)``.

    Variables the checkpoint does not carry but may legitimately lack (non-trained constants;
    with ``backbone_only`` the whole decoder) are drawn by the model's init with ``seed``.
    """
    state_dict = torch_import.read_torch_checkpoint(path)
    model = build_model(arch, **(options or {}))
    init = lambda r: init_variables(model, r)  # noqa: E731
    reference = jax.eval_shape(init, init_key(seed))
    variables, report = torch_import.convert_state_dict(
        state_dict, arch, reference, backbone_only=backbone_only, source=os.fspath(path))
    if any(_is_abstract(v) for v in jax.tree_util.tree_leaves(variables)):
        fresh = jax.jit(init)(init_key(seed))
        variables = jax.tree_util.tree_map(
            lambda v, f: np.asarray(f) if _is_abstract(v) else v, variables, fresh)
    if verbose:
        print(report.summary())
    return variables, report


def _load_training_workdir(workdir: str, arch: str | None, dtype) -> Predictor:
    """The best checkpoint of a training workdir (see `p3m_jax.train.checkpointing`)."""
    import json  # pylint: disable=import-outside-toplevel

    from p3m_jax.train.checkpointing import (  # pylint: disable=import-outside-toplevel
        CHECKPOINT_SUBDIR, RUN_CONFIG_FILE, restore_variables)

    config_path = os.path.join(workdir, RUN_CONFIG_FILE)
    try:
        with open(config_path, encoding="utf-8") as f:
            run = json.load(f)
        saved_arch, options = run["arch"], dict(run.get("model_options", {}))
    except (ValueError, KeyError) as e:
        raise ValueError(f"corrupt training config {config_path}: {e}") from e
    if arch is not None and arch != saved_arch:
        raise ValueError(f"{workdir} trained a {saved_arch} model, not {arch}")
    _, variables = restore_variables(os.path.join(workdir, CHECKPOINT_SUBDIR))
    return Predictor(saved_arch, variables, dtype=dtype, options=options)


def load_pretrained(path: str | os.PathLike, arch: str | None = None, *, dtype=jnp.float32,
                    verbose: bool = False) -> Predictor:
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

    Returns:
      A `Predictor`: ``predictor.forward(x)`` gives the six outputs as numpy arrays.
    """
    if arch is not None and arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    path = os.fspath(path)
    if os.path.isdir(path) and not checkpoints.is_model_checkpoint(path):
        from p3m_jax.train.checkpointing import CHECKPOINT_SUBDIR  # pylint: disable=import-outside-toplevel

        if os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
            return _load_training_workdir(path, arch, dtype)
    if os.path.isdir(path):
        saved_arch, options, variables = checkpoints.load_model_checkpoint(path)
        if arch is not None and arch != saved_arch:
            raise ValueError(f"{path} holds a {saved_arch} model, not {arch}")
        return Predictor(saved_arch, variables, dtype=dtype, options=options)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if arch is None:
        raise ValueError(f"{path} looks like a PyTorch checkpoint: pass arch= (one of "
                         f"{sorted(ARCHITECTURES)})")
    variables, _ = variables_from_torch(path, arch, verbose=verbose)
    return Predictor(arch, variables, dtype=dtype)
