"""Reading the model out of a training workdir of ``python -m p3m_jax.main``, and the orbax options
that workdir's checkpoints are written with (shared with `p3m_jax.train.checkpointing`, which writes
them).

``<workdir>/config.json`` names the arch and model options; ``<workdir>/checkpoints/<step>/state``
holds the train state, of which only the model variables are read here (no mesh, no optimizer, no
input pipeline).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from p3m_jax.common import storage
from p3m_jax.common.constants import BEST_METRIC, CHECKPOINT_SUBDIR, RUN_CONFIG_FILE


def manager_options(*, keep: int, asynchronous: bool, read_only: bool) -> ocp.CheckpointManagerOptions:
    """Retention of the last ``keep`` checkpoints plus the best by validation SAD."""
    policy = cm.AnyPreservationPolicy(
        [
            cm.LatestN(n=keep),
            # BestN keeps the *largest* metric values: rank by -SAD.
            cm.BestN(get_metric_fn=lambda m: -float(m[BEST_METRIC]), n=1, keep_checkpoints_without_metrics=False),
        ]
    )
    # best_fn only makes orbax record each save's metrics and answer `best_step`; what is
    # deleted is decided by the preservation policy.
    return ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        best_fn=lambda m: float(m[BEST_METRIC]),
        best_mode="min",
        enable_async_checkpointing=asynchronous and not read_only,
        create=not read_only,
        # Leftovers of a killed save are removed on a writer's start; a reader leaves them.
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
    )


def open_manager(directory: str, *, keep: int = 2, asynchronous: bool = True, read_only: bool = False):
    """orbax's `CheckpointManager` over a workdir's ``checkpoints`` folder."""
    options = manager_options(keep=keep, asynchronous=asynchronous, read_only=read_only)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))


def best_or_latest_step(manager) -> int | None:
    """The kept step with the lowest validation SAD (the latest when none was evaluated)."""
    best = manager.best_step()
    return best if best is not None else manager.latest_step()


def saved_state_fields(directory: str | os.PathLike, step: int) -> set[str]:
    """The top-level fields of the train state saved at ``<directory>/<step>/state``."""
    with ocp.PyTreeCheckpointer() as reader:
        return set(reader.metadata(storage.resolve(directory) / str(step) / "state").item_metadata)


def restore_variables(directory: str | os.PathLike, step: int | None = None, ema: bool = False) -> tuple[int, dict]:
    """Reads the model variables (params, batch_stats, constants) of a training checkpoint as numpy.

    ``directory`` is ``<workdir>/checkpoints``; ``step`` None picks the best step by validation SAD
    (the latest when none was evaluated). ``ema``: the EMA of the parameters and BatchNorm
    statistics instead (a run trained with ``config.ema_decay`` > 0).
    """
    directory = storage.resolve(directory)
    with storage.reported(directory, "reading training checkpoints"):
        found = directory.is_dir()
    if not found:
        raise FileNotFoundError(f"no training checkpoints at {directory}")
    manager = open_manager(directory, read_only=True)
    try:
        step = best_or_latest_step(manager) if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finished training checkpoint in {directory}")
        state_dir = directory / str(step) / "state"
        with ocp.PyTreeCheckpointer() as reader:
            metadata = reader.metadata(state_dir).item_metadata
            if ema and "ema_params" not in metadata:
                raise ValueError(
                    f"{state_dir} holds no EMA of the parameters: the run was trained with config.ema_decay=0"
                )
            # saved field -> model collection
            prefix = "ema_" if ema else ""
            names = {prefix + "params": "params", prefix + "batch_stats": "batch_stats", "constants": "constants"}
            wanted = {k: v for k, v in metadata.items() if k in names}
            restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
            restored = reader.restore(
                state_dir, args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True)
            )
    finally:
        manager.close()
    restored = {names[k]: v for k, v in restored.items()}
    variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}
    if restored.get("constants"):
        variables["constants"] = restored["constants"]
    return step, variables


def is_training_workdir(path: str | os.PathLike) -> bool:
    path = storage.resolve(path)
    with storage.reported(path, "reading"):
        return (path / CHECKPOINT_SUBDIR).is_dir()


def read_training_workdir(
    workdir: str | os.PathLike, arch: str | None = None, ema: bool = False
) -> tuple[str, dict, dict, int]:
    """``(arch, model options, variables, step)`` of the best checkpoint of a training workdir (the
    latest when none was validated); ``arch``, when given, must be the one it trained; ``ema``: its
    EMA weights (`restore_variables`)."""
    workdir = storage.resolve(workdir)
    config_path = workdir / RUN_CONFIG_FILE
    try:
        with storage.reported(config_path, "reading the run's config"):
            run = json.loads(config_path.read_text(encoding="utf-8"))
        saved_arch, options = run["arch"], dict(run.get("model_options", {}))
    except (ValueError, KeyError) as e:
        raise ValueError(f"corrupt training config {config_path}: {e}") from e
    if arch is not None and arch != saved_arch:
        raise ValueError(f"{workdir} trained a {saved_arch} model, not {arch}")
    step, variables = restore_variables(workdir / CHECKPOINT_SUBDIR, ema=ema)
    return saved_arch, options, variables, step
