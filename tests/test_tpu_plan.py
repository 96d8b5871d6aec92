"""`python -m p3m_jax.main --compile_for=TYPE`: a Cloud TPU run planned on this CPU machine, compiled for the
slice by libtpu's compile-only TPU client (the tpu extra, part of the test extra). The real ResNet-34 P3M-Net
compiles once at a small size; the memory plan's search and the multi-host slice use the stand-in model
(tests/train_helpers.py), which compiles in seconds."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from loop_helpers import REPO, tiny_config
from p3m_jax.train import tpu_plan
from p3m_jax.train.tpu_plan import Target, TargetError, parse_target


def run_main(*args, timeout=900):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "p3m_jax.main", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_accelerator_types_name_their_slices():
    assert parse_target("v5litepod-4") == Target("v5litepod-4", "v5e", "v5e:2x2", (2, 2, 1))
    assert parse_target("v5litepod-8") == Target("v5litepod-8", "v5e", "v5e:2x4", (2, 4, 1))
    assert parse_target("v5litepod-16") == Target("v5litepod-16", "v5e", "v5e:4x4")
    assert parse_target("v6e-8") == Target("v6e-8", "v6e", "v6e:2x4", (2, 4, 1))
    assert parse_target("v5p-8").topology == "v5p:2x2x1"  # 8 TensorCores: 4 chips
    assert parse_target("v5p-64").topology == "v5p:2x4x4"
    assert parse_target("v4-32").topology == "v4:2x2x4"
    assert parse_target("v5e:2x2").topology == "v5e:2x2"
    for wrong in ("v5litepod-3", "v5p-6", "v7-8", "tpu", "v5e:2"):
        with pytest.raises(TargetError, match="known: v5litepod-1/4/8"):
            parse_target(wrong)


def test_a_slice_lists_every_chip_of_every_host():
    devices = parse_target("v5p-64").devices()
    assert len(devices) == 32 and len({d.process_index for d in devices}) == 8
    assert {d.platform for d in devices} == {"tpu"}


def test_an_unknown_type_is_one_line_without_a_traceback():
    result = run_main("--config=default", "--compile_for=v9-8", timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: --compile_for=v9-8: not a Cloud TPU type")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_real_resnet34_step_compiles_for_a_v5e_slice():
    result = run_main(
        "--config=default",
        "--config.data.image_size=64",
        "--config.data.crop_sizes=(64,)",
        "--config.batch_size=4",
        "--config.dtype=bfloat16",
        "--compile_for=v5litepod-4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "for v5litepod-4 (v5e:2x2: 4 chips, 1 host(s)), global batch 4 = 1 per chip at 64x64" in out
    assert "memory plan: this step needs" in out and "the device has 16.00 GiB" in out
    for row in ("total memory", "TFLOP per chip", "GB accessed per chip", "roofline time (estimate)"):
        assert row in out
    assert "not a measurement" in out


@pytest.fixture
def stand_in_model(monkeypatch):
    from train_helpers import use_tiny_model

    use_tiny_model(monkeypatch)


def test_a_batch_that_does_not_fit_gets_a_setting_that_does(stand_in_model, capsys):
    config = tiny_config("/nonexistent", batch_size=32, device_memory_gib=0.02)
    assert tpu_plan.plan_for(config, parse_target("v5litepod-4")) == 1
    out = capsys.readouterr().out
    assert "memory plan: --config.remat=none --config.grad_accum_steps=1 does not fit" in out
    assert "fits (" in out and "(the setting that fits)" in out


def test_a_multi_host_slice_compiles_with_fsdp_parameters(stand_in_model, capsys):
    config = tiny_config("/nonexistent", batch_size=16, param_sharding="fsdp")
    assert tpu_plan.plan_for(config, parse_target("v5litepod-16")) == 0
    out = capsys.readouterr().out
    assert "(v5e:4x4: 16 chips, 4 host(s))" in out and "fsdp parameters" in out
    assert "images/s per chip (estimate)" in out
