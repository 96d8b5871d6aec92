"""Subprocess for tests/test_train_loop.py: moves a training checkpoint between device counts.

    python tests/checkpoint_worker.py DIRECTORY NUM_DEVICES RESTORE_STEP SAVE_STEP

On NUM_DEVICES virtual CPU devices, with FSDP-sharded parameters and Adam state (of the small
stand-in model of tests/train_helpers.py): restores
RESTORE_STEP (unless it is 0) onto this mesh, checks it bit for bit against the numpy copy the
saving process wrote (and that every leaf carries this mesh's sharding), then changes every
leaf, saves SAVE_STEP (unless 0) and writes its numpy copy. Prints "OK" at the end.
"""

import os
import sys

directory, num_devices, restore_step, save_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from p3m_jax.configs import p3m10k  # noqa: E402
from p3m_jax.train.optimizer import OptimizerOptions, make_optimizer  # noqa: E402
from p3m_jax.weights.initialize import init_key  # noqa: E402
from p3m_jax.train import mesh as mesh_lib  # noqa: E402
from p3m_jax.train import state as state_lib  # noqa: E402
from p3m_jax.train.checkpointing import TrainCheckpointer, to_savable  # noqa: E402
from tests.train_helpers import TinyP3M  # noqa: E402


def numpy_leaves(state):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(to_savable(state))]


def expected_path(step):
    return os.path.join(directory, f"expected_{step}.npz")


def main():
    assert jax.device_count() == num_devices
    mesh = mesh_lib.make_mesh()
    model = TinyP3M()  # the checkpoint code is model-agnostic; a small model compiles in seconds
    optimizer, _ = make_optimizer(OptimizerOptions.from_config(p3m10k.get_config().optimizer), 10)
    make = lambda: state_lib.create_train_state(model, optimizer, init_key(0), 64)  # noqa: E731
    abstract = jax.eval_shape(make)
    shardings = state_lib.state_shardings(abstract, mesh, "fsdp")
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    checkpointer = TrainCheckpointer(os.path.join(directory, "checkpoints"))
    if restore_step:
        state = checkpointer.restore(restore_step, abstract, None)
        expected = np.load(expected_path(restore_step))
        got = numpy_leaves(state)
        assert len(got) == len(expected.files)
        for i, leaf in enumerate(got):
            np.testing.assert_array_equal(leaf, expected[f"arr_{i}"])
        for leaf, sharding in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(shardings)):
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.sharding, sharding)
    else:
        state = jax.jit(make, out_shardings=shardings)()
    if save_step:
        # Every leaf changes (params, Adam moments, BatchNorm statistics, step and RNG), so the
        # check on the other side cannot pass on freshly initialised values.
        def perturb(s):
            bump = lambda x: x + jnp.asarray(0.25 * save_step, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
            return s.replace(
                params=jax.tree_util.tree_map(bump, s.params),
                batch_stats=jax.tree_util.tree_map(bump, s.batch_stats),
                opt_state=jax.tree_util.tree_map(bump, s.opt_state),
                step=jnp.asarray(save_step, jnp.int32),
                rng=jax.random.fold_in(s.rng, save_step),
            )

        state = jax.jit(perturb, out_shardings=shardings)(state)
        checkpointer.save(save_step, state, None)
        checkpointer.wait()
        np.savez(expected_path(save_step), *numpy_leaves(state))
    checkpointer.close()
    print("OK")


if __name__ == "__main__":
    main()
