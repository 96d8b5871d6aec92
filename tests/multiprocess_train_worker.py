"""Subprocess of test_train_step.py: one of two local JAX processes (gloo CPU collectives,
2 CPU devices each) training TinyP3M for 3 steps on a global batch; each feeds its half.

    python multiprocess_train_worker.py PORT PROCESS_ID OUT_NPZ
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 2)

from p3m_jax.train.mesh import initialize_distributed_if_needed, make_mesh  # noqa: E402
from train_helpers import make_batch, run_tiny_training  # noqa: E402


def lock_checks(workdir):
    """The workdir lock of a two-process run: process 0 takes it and every process agrees; a
    second run's processes are all refused while it is held."""
    from p3m_jax.train.workdir_lock import WorkdirLockedError, acquire_for_run

    os.makedirs(workdir, exist_ok=True)
    lock = acquire_for_run(workdir, print)
    try:
        acquire_for_run(workdir, print)
        refused = False
    except WorkdirLockedError:
        refused = True
    if lock is not None:
        lock.release()
    return {"lock_held_here": np.bool_(lock is not None), "second_run_refused": np.bool_(refused)}


def main(port, process_id, out_path):
    assert initialize_distributed_if_needed(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id
    )
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    batch = make_batch(8, 32, seed=2)
    state, metrics = run_tiny_training(make_mesh(), batch, steps=3, param_sharding="fsdp")
    # FSDP-sharded parameters span both processes: gather them to every host.
    from jax.experimental import multihost_utils

    params = multihost_utils.process_allgather(state.params, tiled=True)
    stats = multihost_utils.process_allgather(state.batch_stats, tiled=True)
    out = {}
    for prefix, tree in (("params", params), ("batch_stats", stats)):
        for path, v in jax.tree_util.tree_leaves_with_path(tree):
            out[prefix + jax.tree_util.keystr(path)] = np.asarray(v)
    out.update({f"metric_{i}_{k}": v for i, m in enumerate(metrics) for k, v in m.items()})
    out.update(lock_checks(os.path.join(os.path.dirname(out_path), "workdir")))
    np.savez(out_path, **out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
