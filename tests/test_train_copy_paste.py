"""P3M-CP in the training loop: ICP in the input pipeline and FCP's inputs through the sharded train
step into the network. The loop runs the stand-in model of tests/train_helpers.py, which takes FCP
inputs as P3MNet does; FCP inside the real networks is tested in test_copy_paste.py."""

from __future__ import annotations

import json

import numpy as np

from loop_helpers import run_main, tiny_main_args


def test_p3m_cp_trains_on_an_8_device_mesh(data_dir, tmp_path):
    """ICP and FCP on, global batch 8 over 8 virtual devices, FSDP parameters: steps run and paste."""
    workdir = tmp_path / "cp"
    fields = {
        "batch_size": 8,
        "num_train_steps": 3,
        "param_sharding": "fsdp",
        "copy_paste.icp.enabled": True,
        "copy_paste.icp.prob": 1.0,
        "copy_paste.fcp.enabled": True,
        "copy_paste.fcp.prob": 1.0,
        "copy_paste.fcp.layers": "('e0','deep')",  # the stand-in's two feature levels
    }
    result = run_main(
        tiny_main_args(workdir, data_dir, fields), {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 8 device(s)" in result.stdout
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["train/loss"]) for r in rows)
    # Every synthetic train portrait has a facemask; a random crop can still cut most of it away.
    assert sum(r["train/icp_pasted_per_batch"] for r in rows) >= 12
    assert sum(r["train/fcp_samples_per_batch"] for r in rows) >= 12
