"""What a run starts from: a writable workdir, its config.json, and the model variables (random, an
ImageNet backbone, or fine-tuning weights), plus P3M-CP's input transforms."""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from p3m_jax.common import storage
from p3m_jax.common.constants import RUN_CONFIG_FILE
from p3m_jax.common.fileio import atomic_write
from p3m_jax.data.cp_transforms import make_copy_paste_transforms
from p3m_jax.inference.loading import load_pretrained
from p3m_jax.models import init_variables
from p3m_jax.train.config_checks import model_options
from p3m_jax.weights.backbone import load_backbone
from p3m_jax.weights.initialize import variables_from_torch


def prepare_workdir(workdir: str | os.PathLike) -> str:
    """Creates ``workdir`` and proves it is writable (a clear error now, not at the first save).

    Returns it as a string: an absolute local path, or the ``gs://`` path itself (its bucket must exist
    and accept writes: StorageError otherwise)."""
    workdir = os.fspath(storage.resolve(workdir))
    if storage.is_remote(workdir):
        storage.check_bucket(workdir, write=True)
        return workdir
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{jax.process_index()}_{os.getpid()}")
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OSError(f"workdir {workdir} is not writable: {e.strerror or e}") from e
    return workdir


def write_run_config(config, workdir: str) -> None:
    """``<workdir>/config.json``: the arch and model options `load_pretrained` needs, and the config."""
    with atomic_write(storage.resolve(workdir) / RUN_CONFIG_FILE) as f:
        json.dump(
            {
                "arch": config.arch,
                "model_options": model_options(config),
                "config": json.loads(config.to_json_best_effort()),
            },
            f,
            indent=1,
        )


def initial_variables(config, model, rng) -> tuple[Any, str]:
    """Model variables to start from and a one-line description of where they came from."""

    def random_init():
        return jax.jit(lambda r: init_variables(model, r))(rng)

    if config.init.pretrained_backbone:
        variables, report = load_backbone(
            os.fspath(storage.resolve(config.init.pretrained_backbone)), config.arch, random_init()
        )
        return variables, f"ImageNet backbone {config.init.pretrained_backbone}: {report.summary()}"
    path = os.fspath(storage.resolve(config.init.checkpoint)) if config.init.checkpoint else ""
    if path:
        if storage.resolve(path).is_dir():
            loaded = load_pretrained(path, config.arch)
            return loaded.variables, f"fine-tuning from p3m-jax checkpoint {path}"
        loaded, _ = variables_from_torch(path, config.arch, options=model_options(config))
        return loaded, f"fine-tuning from the authors' checkpoint {path}"
    return random_init(), "random initialisation"


def copy_paste_transforms(config) -> list:
    """P3M-CP's per-example input transforms (ICP, and FCP's aligned source faces), when enabled."""
    return make_copy_paste_transforms(config.copy_paste, seed=config.seed)
