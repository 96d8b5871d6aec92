"""Training batches land on an 8-device CPU mesh as global, data-sharded uint8 jax.Arrays (subprocess)."""

import os
import pathlib
import subprocess
import sys
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from p3m_jax import data
    from p3m_jax.data import holdout
    from tests import data_helpers

    holdout.NAMES_CACHE_DIR = sys.argv[2]
    config = data_helpers.build(sys.argv[1])
    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    it = data.create_train_iterator(config, seed=0, global_batch_size=16, sharding=sharding)
    host = data.create_host_iterator(config, seed=0, batch_size=16, process_index=0, process_count=1)
    expected = {"image": ((16, 32, 32, 3), np.uint8), "alpha": ((16, 32, 32, 1), np.uint8),
                "trimap": ((16, 32, 32, 1), np.uint8), "fg": ((16, 32, 32, 3), np.uint8),
                "bg": ((16, 32, 32, 3), np.uint8), "has_fg_bg": ((16,), np.bool_),
                "facemask": ((16, 32, 32, 1), np.uint8), "has_facemask": ((16,), np.bool_)}
    for step in range(2):
        batch = next(it)
        reference = next(host)
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected, batch
        for key, value in batch.items():
            assert isinstance(value, jax.Array) and value.sharding == sharding, key
            shards = value.addressable_shards
            assert len(shards) == 8 and {s.device for s in shards} == set(jax.devices())
            assert all(s.data.shape[0] == 2 for s in shards), key
            assert np.array_equal(np.asarray(value), reference[key]), key
    it.close()
    print("OK")
""")


def test_batches_on_8_device_mesh(tmp_path):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "tfds"), str(tmp_path / "names")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
