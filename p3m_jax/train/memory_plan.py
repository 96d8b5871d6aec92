"""The memory plan: before the first step, the compiled train step's memory per device is read from
XLA (`Compiled.memory_analysis`) and compared with the device's. A step that does not fit stops the
run with one line naming settings that do (each found by compiling it), instead of an out-of-memory
crash after minutes of compiling and loading.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from p3m_jax.models import remat_policy
from p3m_jax.train.step import make_loss_fn

GIB = 2**30


class MemoryPlanError(RuntimeError):
    """The train step does not fit the device; the message says what would."""


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes per device of a compiled program: its arguments (the state and the batch), outputs and
    temporaries; buffers donated from arguments to outputs (``alias``) count once."""

    argument: int
    output: int
    temp: int
    alias: int
    exceeded: bool = False  # the compiler refused the program: it needs more than the device has

    @property
    def total(self) -> int:
        return self.argument + self.output + self.temp - self.alias

    def describe(self) -> str:
        return (
            f"more than {gib(self.total)} (the compiler ran out of device memory)" if self.exceeded else gib(self.total)
        )

    @classmethod
    def of(cls, compiled) -> "StepMemory | None":
        """From ``jax.jit(...).lower(...).compile()``; None where the backend reports nothing."""
        analysis = compiled.memory_analysis()
        if analysis is None:
            return None
        get = lambda name: int(getattr(analysis, name, 0) or 0)
        return cls(
            get("argument_size_in_bytes"),
            get("output_size_in_bytes"),
            get("temp_size_in_bytes"),
            get("alias_size_in_bytes"),
            bool(getattr(analysis, "exceeded", False)),
        )


@dataclasses.dataclass(frozen=True)
class Setting:
    """What the plan may change: the rematerialisation policy and the micro-batches per step."""

    remat: str
    grad_accum_steps: int

    def flags(self) -> str:
        return f"--config.remat={self.remat} --config.grad_accum_steps={self.grad_accum_steps}"


def backward_residual_bytes(model, state, batch) -> int:
    """Bytes JAX keeps from the forward pass of the training loss for its backward pass (the residuals
    of `jax.vjp` with respect to the parameters), from tracing alone (``state`` and ``batch`` may be
    abstract): what rematerialisation lowers before XLA schedules the program, where `StepMemory` is
    what the compiled program then needs."""

    def residuals(state, batch):
        loss_fn = make_loss_fn(state, batch, model=model)
        _, vjp_fn = jax.vjp(lambda params: loss_fn(params)[0], state.params)
        return jax.tree_util.tree_leaves(vjp_fn)

    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.eval_shape(residuals, state, batch))


def device_memory_bytes(device, override_gib: float = 0.0) -> int | None:
    """The memory a step may use on ``device``: ``override_gib`` when > 0 (to plan for another card),
    else what its allocator reports (``bytes_limit``); on the CPU, the machine's available RAM shared by
    its CPU devices; None where nothing is known."""
    if override_gib > 0:
        return int(override_gib * GIB)
    if device.platform == "cpu":
        available = host_memory_available()
        return None if available is None else available // max(1, len(jax.local_devices(backend="cpu")))
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def host_memory_available(meminfo: str = "/proc/meminfo") -> int | None:
    """The RAM that new allocations can take without swapping (Linux's MemAvailable), in bytes."""
    try:
        with open(meminfo) as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _fallback_settings(current: Setting, per_device_batch: int) -> list[Setting]:
    """Settings to try when ``current`` does not fit, cheapest first: the decoder policy (it recomputes
    only BatchNorm, ReLU and resizing) at the same and then at each larger accumulation that divides the
    per-device batch, then the same with full remat (about a third more FLOPs)."""
    steps = [n for n in range(current.grad_accum_steps, per_device_batch + 1) if per_device_batch % n == 0]
    light = current.remat if current.remat != "none" else "decoder"
    candidates = [Setting(light, n) for n in steps] + [Setting("full", n) for n in steps]
    return [setting for setting in dict.fromkeys(candidates) if setting != current]


def plan(
    compile_setting: Callable[[Setting], Any],
    current: Setting,
    per_device_batch: int,
    limit: int | None,
    log: Callable[[str], Any],
    limit_note: str = "",
) -> Any:
    """Compiles the step at ``current`` and returns the compiled program when it fits ``limit`` bytes
    (always where the limit is unknown). Otherwise compiles the fallback settings until one fits and
    raises `MemoryPlanError` naming it (or saying that none does). ``limit_note`` says where the limit
    comes from when it is not the device's own."""
    compiled = compile_setting(current)
    memory = StepMemory.of(compiled)
    if memory is None:
        log("memory plan: this backend reports no memory use for the compiled step")
        return compiled
    if limit is None:
        log(
            f"memory plan: this step needs {memory.describe()} per device; the device reports no memory limit "
            f"(set config.device_memory_gib to plan for a card)"
        )
        return compiled
    log(f"memory plan: this step needs {memory.describe()} per device; the device has {gib(limit)}{limit_note}")
    if memory.total <= limit and not memory.exceeded:
        return compiled
    log(f"memory plan: {current.flags()} does not fit; compiling other settings to find one that does")
    tried = [f"{current.remat}/{current.grad_accum_steps}: {memory.describe()}"]
    for setting in _fallback_settings(current, per_device_batch):
        needed = StepMemory.of(compile_setting(setting))
        tried.append(f"{setting.remat}/{setting.grad_accum_steps}: {needed.describe()}")
        if needed.total <= limit and not needed.exceeded:
            raise MemoryPlanError(
                f"the train step needs {memory.describe()} per device but the device has {gib(limit)}; "
                f"{setting.flags()} fits ({gib(needed.total)}, compiled) and keeps the global batch"
            )
    raise MemoryPlanError(
        f"the train step needs {memory.describe()} per device but the device has {gib(limit)}, and no remat/"
        f"accumulation setting fits ({'; '.join(tried)}): lower config.batch_size or config.data.image_size, "
        f"or use more devices with config.param_sharding=fsdp"
    )


def current_setting(config) -> Setting:
    return Setting(remat_policy(config.remat), int(config.grad_accum_steps))


__all__ = [
    "GIB",
    "backward_residual_bytes",
    "MemoryPlanError",
    "Setting",
    "StepMemory",
    "current_setting",
    "device_memory_bytes",
    "plan",
]
