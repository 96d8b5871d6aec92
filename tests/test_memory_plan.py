"""The memory plan: the compiled train step's memory is read before the first step and a step that
does not fit the device stops the run with a suggestion found by compiling (the stand-in model)."""

from __future__ import annotations


import jax
import optax
import pytest

from loop_helpers import tiny_config
from p3m_jax.train import loop, make_mesh, make_train_step, memory_plan, state_shardings
from p3m_jax.train.memory_plan import GIB, MemoryPlanError, Setting, StepMemory, device_memory_bytes, plan
from p3m_jax.train.state import create_train_state
from train_helpers import TinyP3M, make_batch


@pytest.fixture(scope="module", autouse=True)
def stand_in_model(tiny_model):
    yield


def _compiler():
    """``setting -> compiled`` for TinyP3M on a batch of 8 (the stand-in ignores the remat policy)."""
    mesh, model, tx = make_mesh(), TinyP3M(width=32), optax.sgd(0.1)
    state = create_train_state(model, tx, jax.random.key(0), 32)
    shardings = state_shardings(jax.eval_shape(lambda: state), mesh)
    batch = make_batch(8, 64)

    def compile_setting(setting):
        step = make_train_step(model, tx, mesh, shardings, grad_accum_steps=setting.grad_accum_steps)
        return step.lower(state, batch).compile()

    return compile_setting


def test_a_step_that_does_not_fit_stops_with_a_setting_that_fits():
    compile_setting = _compiler()
    needs = {steps: StepMemory.of(compile_setting(Setting("none", steps))).total for steps in (1, 2, 4, 8)}
    assert needs[1] > needs[2] > needs[4], needs  # micro-batches lower the peak
    logs = []
    # Between what 2 and 4 micro-batches need: 4 fits, and is what the plan names.
    limit = (needs[2] + needs[4]) // 2
    with pytest.raises(MemoryPlanError) as error:
        plan(compile_setting, Setting("none", 1), 8, limit, logs.append)
    message = str(error.value)
    assert "--config.remat=decoder --config.grad_accum_steps=4 fits" in message
    assert f"{needs[1] / GIB:.2f} GiB per device but the device has {limit / GIB:.2f} GiB" in message
    assert f"this step needs {needs[1] / GIB:.2f} GiB per device; the device has" in logs[0]
    # Nothing fits: the line says so and what else to change.
    with pytest.raises(MemoryPlanError, match="no remat/accumulation setting fits .*config.batch_size"):
        plan(compile_setting, Setting("none", 1), 8, needs[8] // 2, logs.append)
    # It fits: the compiled step is returned and runs.
    compiled = plan(compile_setting, Setting("none", 2), 8, needs[1], logs.append)
    assert StepMemory.of(compiled).total == needs[2]


def test_device_memory_comes_from_the_config_or_the_device(tmp_path):
    cpu = jax.devices()[0]
    # The CPU's limit: the machine's available RAM (Linux's MemAvailable), shared by its CPU devices.
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   12000000 kB\n")
    assert memory_plan.host_memory_available(str(meminfo)) == 12000000 * 1024
    assert memory_plan.host_memory_available(str(tmp_path / "none")) is None
    available = memory_plan.host_memory_available()
    limit = device_memory_bytes(cpu)
    assert 0 < limit <= available // len(jax.local_devices()) * 1.5
    assert device_memory_bytes(cpu, 24.0) == 24 * GIB


def test_a_cpu_run_stops_when_the_step_needs_more_than_the_free_ram(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory_plan, "host_memory_available", lambda: 1024 * len(jax.local_devices()))
    with pytest.raises(MemoryPlanError, match="the device has 0.00 GiB, and no remat/accumulation setting fits"):
        loop.train_and_evaluate(tiny_config(data_dir), tmp_path / "w")
    assert "the device has 0.00 GiB (the machine's available RAM per CPU device" in capsys.readouterr().out


def test_the_run_stops_before_training_when_the_step_does_not_fit(data_dir, tmp_path, capsys):
    with pytest.raises(MemoryPlanError, match="the device has 0.00 GiB"):
        loop.train_and_evaluate(tiny_config(data_dir, device_memory_gib=1e-6), tmp_path / "w")
    checkpoints = tmp_path / "w" / "checkpoints"
    assert not checkpoints.exists() or not any(p.name.isdigit() for p in checkpoints.iterdir())
    capsys.readouterr()
    result = loop.train_and_evaluate(tiny_config(data_dir, device_memory_gib=64.0, num_train_steps=1), tmp_path / "ok")
    assert result["step"] == 1
    out = capsys.readouterr().out
    assert "memory plan: this step needs" in out and "per device; the device has 64.00 GiB" in out
