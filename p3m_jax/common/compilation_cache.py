"""The switch for JAX's persistent compilation cache, shared by every command."""

from __future__ import annotations

import logging
import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from p3m_jax.common.constants import DEFAULT_CACHE_DIR


def enable_compilation_cache(cache_dir=DEFAULT_CACHE_DIR) -> str:
    """Turns on JAX's persistent compilation cache in `cache_dir` (every compiled program is kept)."""
    cache_dir = os.fspath(cache_dir)
    if "://" not in cache_dir:  # JAX writes gs:// caches itself
        os.makedirs(cache_dir, exist_ok=True)
    if jax.config.jax_compilation_cache_dir not in (None, cache_dir):
        compilation_cache.reset_cache()  # JAX keeps using the first folder it opened otherwise
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir


def enable_unless_set(cache_dir: str | None) -> str | None:
    """`enable_compilation_cache(cache_dir)` unless JAX already has a cache folder (e.g. from
    JAX_COMPILATION_CACHE_DIR); "" or None leaves it off. An unusable folder is reported and skipped,
    since the cache only saves compile time. Returns the folder in use, or None."""
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    if not cache_dir:
        return None
    try:
        return enable_compilation_cache(os.path.expanduser(cache_dir))
    except OSError as e:
        logging.warning("compilation cache %s unusable (%s); compiling without it", cache_dir, e)
        return None


def enable_for_command(cache_dir: str | None) -> str | None:
    """A command's `--cache_dir`: a folder given is used and "" turns the cache off; without one, JAX's
    folder if it has one (e.g. from JAX_COMPILATION_CACHE_DIR), else `DEFAULT_CACHE_DIR`."""
    if cache_dir is None:
        return enable_unless_set(DEFAULT_CACHE_DIR)
    return enable_compilation_cache(cache_dir) if cache_dir else None
