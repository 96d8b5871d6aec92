"""Helpers shared by the model tests: cheap filled variables, output checks, torch tensors, and
Swin's shifted-window attention mask labelled by region slices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from p3m_jax.models import init_variables


def randomize(variables, seed=0):
    """Replaces every leaf by random values of its shape (a harder test than the init)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda v: jnp.asarray(rng.normal(size=v.shape) * 0.3 + (1.0 if v.ndim == 1 else 0.0), jnp.float32), variables
    )


def filled_variables(model, seed=0):
    """Cheap stand-in for ``init`` (no compilation): every variable of the model's tree,
    kernels ~ N(0, 1/fan_in), scales 1, biases 0, BN statistics (0, 1)."""
    shapes = jax.eval_shape(lambda r: init_variables(model, r), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name in ("kernel", "w", "relative_position_bias_table"):
            fan_in = int(np.prod(s.shape[:-1])) if name == "kernel" else s.shape[-1]
            return (rng.normal(size=s.shape) / np.sqrt(fan_in)).astype(np.float32)
        if name in ("scale", "var"):
            return np.ones(s.shape, np.float32)
        return np.zeros(s.shape, np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def t(a):
    """A float32 torch tensor holding a copy of ``a``."""
    return torch.from_numpy(np.asarray(a, np.float32).copy())


def assert_p3m_outputs(out, batch, hw):
    """The six P3M outputs have their shapes, are finite, and the fused alpha is in [0, 1]."""
    for name, channels in [("global", 3), ("local", 1), ("fusion", 1), ("side2", 3), ("side1", 3), ("side0", 3)]:
        assert out[name].shape == (batch, *hw, channels), name
        assert bool(jnp.isfinite(out[name]).all()), name
    assert 0.0 <= float(out["fusion"].min()) and float(out["fusion"].max()) <= 1.0


def torch_window_mask(h, w, window, shift):
    """The authors' construction: label regions of the padded, shifted map by slices."""
    ph, pw = (-h) % window, (-w) % window
    img = torch.zeros(h + ph, w + pw)

    def slices(pad):
        if shift > 0:
            if pad > 0:
                top, bottom = max(pad + shift, window), min(pad + shift, window)
                return (slice(0, -top), slice(-top, -bottom), slice(-bottom, -shift), slice(-shift, None))
            return slice(0, -window), slice(-window, -shift), slice(-shift, None)
        return (slice(0, -pad), slice(-pad, None)) if pad else (slice(0, None),)

    cnt = 0
    for hs in slices(ph):
        for ws in slices(pw):
            img[hs, ws] = cnt
            cnt += 1
    hp, wp = img.shape
    win = img.view(hp // window, window, wp // window, window).permute(0, 2, 1, 3)
    win = win.reshape(-1, window * window)
    diff = win[:, None, :] - win[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))
