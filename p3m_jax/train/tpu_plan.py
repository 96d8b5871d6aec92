"""Planning a Cloud TPU run from any machine: `python -m p3m_jax.main --config=... --compile_for=TYPE`.

libtpu compiles for a TPU topology without a TPU (`jax.experimental.topologies.get_topology_desc`).
The run's mesh is built over every chip of the slice, all hosts included; the train step and the
validation forward pass are compiled from abstract inputs (nothing is allocated, no dataset is read).
The plan prints, per chip: the memory of the compiled step against the chip's HBM, XLA's FLOPs and
bytes accessed per step, and a roofline estimate of the step time (the larger of FLOPs / peak and
bytes / bandwidth, with the published peaks of `CHIPS`): a model of the step, not a measurement.
A step that does not fit gets the memory plan's search for a setting that does, on that target.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from p3m_jax.train import memory_plan
from p3m_jax.train import mesh as mesh_lib
from p3m_jax.train.config_checks import ConfigError, validate_config
from p3m_jax.train.program import TrainProgram

GIB = memory_plan.GIB


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures of a TPU generation: peak bfloat16 compute, HBM size and bandwidth."""

    name: str
    peak_bf16_flops: float
    hbm_bytes: int
    hbm_bytes_per_s: float


# From the Cloud TPU documentation's system architecture pages (per chip). HBM sizes are the published
# GB/GiB figures; XLA keeps a little of it for itself, so a step that needs nearly all of it may not fit.
CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * GIB, 1200e9),
    "v5e": Chip("TPU v5e", 197e12, 16 * GIB, 819e9),
    "v5p": Chip("TPU v5p", 459e12, 95 * GIB, 2765e9),
    "v6e": Chip("TPU v6e (Trillium)", 918e12, 32 * GIB, 1640e9),
}
PEAKS_SOURCE = "published per-chip peaks (Cloud TPU documentation, system architecture)"

# Chips per slice of the single-host and multi-host slices Cloud TPU offers, per accelerator-type prefix.
_2D_SHAPES = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_TYPE_PREFIXES = {"v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e", "v5p": "v5p", "v4": "v4"}


class TargetError(ValueError):
    """An accelerator type that is not a Cloud TPU slice this knows; the message lists the known ones."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A Cloud TPU slice: its generation, JAX topology name and how libtpu should lay out its hosts."""

    name: str
    generation: str
    topology: str
    chips_per_host_bounds: tuple[int, int, int] | None = None

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]

    def devices(self) -> list:
        """The slice's abstract TPU devices (one per chip), from libtpu's compile-only client."""
        # A plan never touches a TPU: several planners (or tests) may load libtpu at once, which its
        # lock file (/tmp/libtpu_lockfile, for processes that drive real chips) would otherwise refuse.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

            kwargs = {"chip_config_name": "megacore"} if self.generation in ("v4", "v5p") else {}
            if self.chips_per_host_bounds:
                kwargs["chips_per_host_bounds"] = self.chips_per_host_bounds
            return list(topologies.get_topology_desc(topology_name=self.topology, platform="tpu", **kwargs).devices)
        except Exception as error:  # noqa: BLE001  (no libtpu: a RuntimeError of jax's plugin discovery)
            if _libtpu_installed():
                raise
            raise RuntimeError(
                f'--compile_for needs libtpu to compile for a TPU: pip install "p3m-jax[tpu]" ({error})'
            ) from None


def _libtpu_installed() -> bool:
    import importlib.util  # pylint: disable=import-outside-toplevel

    return importlib.util.find_spec("libtpu") is not None


def _cube(chips: int) -> tuple[int, int, int]:
    """The 3-D torus of a v4/v5p slice of ``chips`` chips: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ..."""
    if chips == 4:
        return (2, 2, 1)
    shape, axis = [2, 2, 2], 2
    while int(np.prod(shape)) < chips:
        shape[axis] *= 2
        axis = (axis - 1) % 3
    if int(np.prod(shape)) != chips:
        raise TargetError(f"{chips} chips is not a slice size")
    return tuple(shape)


def known_types() -> str:
    return (
        "v5litepod-1/4/8/16/32/64/128/256, v6e-1/4/8/16/32/64/128/256, v5p-8/16/32/64/128/..., "
        "v4-8/16/32/64/..., or a JAX topology name such as v5e:2x2 or v5p:2x2x2"
    )


def parse_target(text: str) -> Target:
    """A Cloud TPU accelerator type as gcloud names it (``v5litepod-16``, ``v5p-8``, ``v6e-8``, ``v4-32``)
    or a JAX topology name (``v5e:2x2``); TargetError listing the known ones otherwise."""
    text = text.strip()
    unknown = TargetError(f"--compile_for={text}: not a Cloud TPU type this knows; known: {known_types()}")
    if ":" in text:
        generation = text.split(":")[0]
        if generation not in CHIPS or not re.fullmatch(r"\d+(x\d+){1,2}", text.split(":", 1)[1]):
            raise unknown
        return Target(text, generation, text)
    match = re.fullmatch(r"(v5litepod|v5e|v6e|v5p|v4)-(\d+)", text)
    if not match:
        raise unknown
    generation, count = _TYPE_PREFIXES[match.group(1)], int(match.group(2))
    if generation in ("v5e", "v6e"):
        if count not in _2D_SHAPES:
            raise unknown
        x, y = _2D_SHAPES[count]
        # Slices of up to 8 chips are one host; larger ones have 4 chips per host (libtpu's default).
        bounds = (x, y, 1) if count <= 8 else None
        return Target(text, generation, f"{generation}:{x}x{y}", bounds)
    if count % 2 or count < 8:  # v4 and v5p count TensorCores: two per chip
        raise unknown
    try:
        shape = _cube(count // 2)
    except TargetError:
        raise unknown from None
    return Target(text, generation, f"{generation}:{'x'.join(map(str, shape))}")


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """Per chip: the compiled program's memory, and XLA's FLOPs and bytes accessed."""

    memory: memory_plan.StepMemory
    flops: float
    bytes_accessed: float
    compile_s: float

    @classmethod
    def of(cls, compiled, compile_s: float) -> "ProgramCost":
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else (analysis or {})
        return cls(
            memory_plan.StepMemory.of(compiled),
            float(analysis.get("flops", 0.0)),
            float(analysis.get("bytes accessed", 0.0)),
            compile_s,
        )

    @property
    def fits(self) -> bool:
        return self.memory is not None and not self.memory.exceeded

    def roofline_s(self, chip: Chip) -> float:
        return max(self.flops / chip.peak_bf16_flops, self.bytes_accessed / chip.hbm_bytes_per_s)


class _OutOfMemory:
    """What a compile that ran out of HBM gives the memory plan: XLA:TPU refuses such a program
    ("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm ... (X G) exceeds available HBM (Y G)"),
    and the size it needed, read from that message, counts as its temporaries."""

    def __init__(self, message: str, hbm_bytes: int):
        sizes = [float(x) for x in re.findall(r"\(([\d.]+)G\)", message)]
        self.needed = int(sizes[0] * GIB) if sizes else hbm_bytes

    def memory_analysis(self):
        return dataclasses.make_dataclass("Analysis", ["temp_size_in_bytes", "exceeded"])(self.needed, True)

    def cost_analysis(self):
        return {}


def _compile_or_out_of_memory(fn, hbm_bytes: int):
    try:
        return fn()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return _OutOfMemory(str(error), hbm_bytes)


def _timed_compile(fn):
    start = time.perf_counter()
    compiled = fn()
    return compiled, time.perf_counter() - start


def _validation_cost(config, model, device) -> ProgramCost:
    """The validation forward pass of one image at the crop size on one chip (eval mode, the run's dtype)."""
    size = int(config.data.image_size)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
    sharding = jax.sharding.SingleDeviceSharding(device)
    variables = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32, sharding=sharding)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)["fusion"])
    compiled, seconds = _timed_compile(lambda: forward.lower(variables, image).compile())
    return ProgramCost.of(compiled, seconds)


def plan_for(config, target: Target, log: Callable[[str], None] = print) -> int:
    """Compiles ``config``'s train step and validation pass for ``target`` and prints the plan; 0 when the
    step fits the chip's HBM, else 1 after the memory plan named a setting that fits (or none)."""
    devices = target.devices()
    chips = len(devices)
    validate_config(config, num_devices=chips)
    hosts = len({d.process_index for d in devices})
    per_chip = config.batch_size // chips
    log(
        f"compiling {config.arch} ({config.dtype}, remat {config.remat}, accumulation {config.grad_accum_steps}, "
        f"{config.param_sharding} parameters) for {target.name} ({target.topology}: {chips} chips, {hosts} "
        f"host(s)), global batch {config.batch_size} = {per_chip} per chip at {config.data.image_size}x"
        f"{config.data.image_size}"
    )
    program = TrainProgram.build(config, mesh_lib.make_mesh(devices))
    chip = target.chip
    costs = {}

    def compile_setting(setting):
        compiled, seconds = _timed_compile(
            lambda: _compile_or_out_of_memory(lambda: program.compile(setting), chip.hbm_bytes)
        )
        costs[setting] = ProgramCost.of(compiled, seconds)
        return compiled

    current = memory_plan.current_setting(config)
    # config.device_memory_gib plans for less than the chip's HBM (room kept for something else).
    limit = int(float(config.device_memory_gib) * GIB) if float(config.device_memory_gib) > 0 else chip.hbm_bytes
    try:
        memory_plan.plan(compile_setting, current, per_chip, min(limit, chip.hbm_bytes), log)
        fits = True
    except memory_plan.MemoryPlanError as error:
        log(f"does not fit: {error}")
        fits = False
    validation = _validation_cost(config, program.model, devices[0])
    # The table shows the run's setting when it fits, else the setting the memory plan found (if any).
    limit = min(limit, chip.hbm_bytes)
    shown = next((s for s, cost in costs.items() if cost.fits and cost.memory.total <= limit), current)
    log(f"plan for {target.name} with {shown.flags()}" + ("" if shown == current else " (the setting that fits)"))
    log(format_plan(target, per_chip, costs[shown], validation))
    return 0 if fits else 1


def format_plan(target: Target, per_chip: int, step: ProgramCost, validation: ProgramCost) -> str:
    """The plan's table: per chip, memory against HBM, FLOPs, bytes accessed, the roofline time."""
    chip = target.chip
    if not step.fits:
        return f"train step: needs {step.memory.describe()} per chip; a {chip.name} chip has {_gib(chip.hbm_bytes)}"
    rows = [
        ("program", "train step", "validation (1 image)"),
        ("arguments", _gib(step.memory.argument), _gib(validation.memory.argument)),
        ("temporaries", _gib(step.memory.temp), _gib(validation.memory.temp)),
        ("total memory", _gib(step.memory.total), _gib(validation.memory.total)),
        (f"HBM of a {chip.name} chip", _gib(chip.hbm_bytes), _gib(chip.hbm_bytes)),
        ("TFLOP per chip", f"{step.flops / 1e12:.3f}", f"{validation.flops / 1e12:.3f}"),
        ("GB accessed per chip", f"{step.bytes_accessed / 1e9:.1f}", f"{validation.bytes_accessed / 1e9:.1f}"),
        ("roofline time (estimate)", _ms(step.roofline_s(chip)), _ms(validation.roofline_s(chip))),
        ("images/s per chip (estimate)", f"{per_chip / step.roofline_s(chip):.1f}", ""),
        ("compile time here", f"{step.compile_s:.0f} s", f"{validation.compile_s:.0f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{r[0]:<{width}}  {r[1]:>14}  {r[2]:>20}" for r in rows]
    bound = (
        "memory traffic" if step.bytes_accessed / chip.hbm_bytes_per_s > step.flops / chip.peak_bf16_flops else "FLOPs"
    )
    lines.append(
        f"roofline: the larger of FLOPs / {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s (bf16 peak) and bytes / "
        f"{chip.hbm_bytes_per_s / 1e9:.0f} GB/s (HBM), {PEAKS_SOURCE}; the step is bound by {bound}. "
        f"An estimate from XLA's cost analysis, not a measurement."
    )
    return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


__all__ = [
    "CHIPS",
    "Chip",
    "ConfigError",
    "ProgramCost",
    "Target",
    "TargetError",
    "format_plan",
    "parse_target",
    "plan_for",
]
