"""Variables of a P3M-Net from nothing or from the authors' PyTorch weights: random initialisation
(compiled once per model), and conversion of a ``.pth`` with what it lacks drawn fresh."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from p3m_jax.models import build_model, init_variables
from p3m_jax.weights import torch_import


def init_key(seed: int) -> jax.Array:
    """PRNG key for weight initialization.

    The "rbg" generator compiles faster than the default threefry on XLA:CPU, where compiling the
    ~400 random initializers of a P3M-Net otherwise dominates start-up time.
    """
    return jax.random.key(seed, impl="rbg")


def _is_abstract(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def model_config_key(arch: str, dtype, options: dict) -> tuple:
    """What identifies a built model: its arch, compute dtype and `build_model` options."""
    return arch, jnp.dtype(dtype).name, json.dumps(options, sort_keys=True, default=str)


# Jitted initializers by `_model_config_key`: compiling one (the initializers and a forward pass) takes
# seconds, and jit reuses the compiled program only for the same function.
_INITIALIZERS: dict[tuple, Any] = {}
_INITIALIZERS_LOCK = threading.Lock()


def random_variables(arch: str, seed: int = 0, *, dtype=jnp.float32, options: dict | None = None):
    """Freshly initialized variables of ``build_model(arch, dtype=dtype, **options)`` from ``init_key(seed)``;
    the initializer is compiled once per process for each model."""
    options = dict(options or {})
    key = model_config_key(arch, dtype, options)
    with _INITIALIZERS_LOCK:
        initializer = _INITIALIZERS.get(key)
        if initializer is None:
            model = build_model(arch, dtype=dtype, **options)
            initializer = _INITIALIZERS[key] = jax.jit(lambda r: init_variables(model, r))
    return initializer(init_key(seed))


def variables_from_torch(
    path: str | os.PathLike,
    arch: str,
    *,
    backbone_only: bool = False,
    options: dict | None = None,
    seed: int = 0,
    verbose: bool = False,
):
    """Reads an authors' ``.pth`` and converts it for ``arch``; returns ``(variables, report)``.

    Variables the checkpoint does not carry but may legitimately lack (non-trained constants;
    with ``backbone_only`` the whole decoder) are drawn by the model's init with ``seed``.
    """
    state_dict = torch_import.read_torch_checkpoint(path)
    model = build_model(arch, **(options or {}))
    init = lambda r: init_variables(model, r)  # noqa: E731
    reference = jax.eval_shape(init, init_key(seed))
    variables, report = torch_import.convert_state_dict(
        state_dict, arch, reference, backbone_only=backbone_only, source=os.fspath(path)
    )
    if any(_is_abstract(v) for v in jax.tree_util.tree_leaves(variables)):
        fresh = random_variables(arch, seed, options=options)
        variables = jax.tree_util.tree_map(lambda v, f: np.asarray(f) if _is_abstract(v) else v, variables, fresh)
    if verbose:
        print(report.summary())
    return variables, report
