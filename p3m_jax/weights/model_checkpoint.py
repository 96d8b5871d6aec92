"""p3m-jax's own model checkpoint format (orbax).

A model checkpoint is a directory::

    OUT_DIR/
      p3m_model.json     {"format": 1, "arch": "resnet34", "options": {...}}
      variables/         orbax StandardCheckpointer tree: params, batch_stats, [constants]

Locally it is written to a temporary sibling directory and renamed into place at the end; in a
``gs://`` bucket (no rename) ``p3m_model.json`` is written last. Either way an interrupted save never
leaves a directory that reads as a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

from p3m_jax.common import fileio, storage

MODEL_META_FILE = "p3m_model.json"
VARIABLES_DIR = "variables"
FORMAT_VERSION = 1


def is_model_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by `save_model_checkpoint`."""
    path = storage.resolve(path)
    with storage.reported(path, "reading"):
        return (path / MODEL_META_FILE).is_file()


def save_model_checkpoint(
    path: str | os.PathLike, arch: str, variables: Any, *, options: dict | None = None, overwrite: bool = False
) -> str:
    """Saves model variables with their architecture name; returns the absolute path."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    if storage.is_remote(path):
        return _save_to_bucket(storage.resolve(path), arch, variables, options=options, overwrite=overwrite)
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        os.chmod(tmp, fileio.usual_mode(directory=True))  # mkdtemp's 0700 would hide it from other users
        variables = jax.tree_util.tree_map(np.asarray, variables)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(tmp, VARIABLES_DIR), variables)
            checkpointer.wait_until_finished()
        meta = {"format": FORMAT_VERSION, "arch": arch, "options": options or {}}
        with open(os.path.join(tmp, MODEL_META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _save_to_bucket(path, arch: str, variables: Any, *, options: dict | None, overwrite: bool) -> str:
    """`save_model_checkpoint` into a bucket: the variables first, the metadata object last."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    storage.check_bucket(path, write=True)
    with storage.reported(path, "saving the model checkpoint"):
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
            path.rmtree()
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path / VARIABLES_DIR, jax.tree_util.tree_map(np.asarray, variables))
            checkpointer.wait_until_finished()
        meta = {"format": FORMAT_VERSION, "arch": arch, "options": options or {}}
        storage.write_object(path / MODEL_META_FILE, json.dumps(meta, indent=2).encode("utf-8"))
    return os.fspath(path)


def load_model_checkpoint(path: str | os.PathLike) -> tuple[str, dict, Any]:
    """Reads a model checkpoint; returns ``(arch, options, variables)`` (numpy leaves)."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    path = storage.resolve(path)
    meta_path = path / MODEL_META_FILE
    if not is_model_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a p3m-jax model checkpoint (no {MODEL_META_FILE})")
    try:
        with storage.reported(meta_path, "reading"):
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        arch, options = meta["arch"], dict(meta.get("options", {}))
    except (ValueError, KeyError) as e:
        raise ValueError(f"corrupt checkpoint metadata {meta_path}: {e}") from e
    if meta.get("format", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer p3m-jax (format {meta['format']})")
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(path / VARIABLES_DIR)
    variables = jax.tree_util.tree_map(np.asarray, variables)
    return arch, options, variables
