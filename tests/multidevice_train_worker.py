"""Subprocess of test_train_step.py: TinyP3M training on 1 device vs 8 virtual CPU devices
(replicated and FSDP-sharded parameters; and with gradient accumulation). Writes one .npz per run
into argv[1]."""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from p3m_jax.train.mesh import DATA_AXIS, make_mesh  # noqa: E402
from train_helpers import flat, make_batch, run_tiny_training  # noqa: E402


def main(out_dir):
    assert jax.device_count() == 8, jax.devices()
    # Mixed has_fg_bg exercises the masked composition term across shards.
    batch = make_batch(8, 32, seed=1, has_fg_bg=[1, 1, 0, 1, 1, 1, 0, 1])
    runs = {
        "one": (make_mesh(jax.devices()[:1]), "replicated"),
        "replicated": (make_mesh(), "replicated"),
        "fsdp": (make_mesh(), "fsdp"),
    }
    for name, (mesh, sharding) in runs.items():
        state, metrics = run_tiny_training(mesh, batch, steps=2, param_sharding=sharding)
        save(out_dir, name, state, metrics)
    # Gradient accumulation: 2 micro-batches of 8, each split over the 8 devices.
    batch = make_batch(16, 32, seed=5, has_fg_bg=[1, 0] * 8)
    for name, mesh, sharding in (
        ("accum_one", make_mesh(jax.devices()[:1]), "replicated"),
        ("accum_fsdp", make_mesh(), "fsdp"),
    ):
        state, metrics = run_tiny_training(mesh, batch, steps=2, param_sharding=sharding, grad_accum_steps=2)
        save(out_dir, name, state, metrics)


def save(out_dir, name, state, metrics):
    sharded = sum(DATA_AXIS in tuple(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(state.params))
    out = {f"params{k}": v for k, v in flat(state.params).items()}
    out.update({f"batch_stats{k}": v for k, v in flat(state.batch_stats).items()})
    out.update({f"metric_{i}_{k}": v for i, m in enumerate(metrics) for k, v in m.items()})
    out["num_sharded_params"] = np.asarray(sharded)
    np.savez(os.path.join(out_dir, f"{name}.npz"), **out)


if __name__ == "__main__":
    main(sys.argv[1])
