"""XLA compiler options for the training, evaluation and inference programs on the CPU."""

from __future__ import annotations

import functools

import jax
import numpy as np

# XLA:CPU compiles convolutions into YNNPACK calls by default; with this option it keeps YNNPACK
# for matmuls and reductions and compiles convolutions with its own (Eigen) kernels, which are
# faster for this network's convolutions (docs/performance.md). The CPU's bfloat16 convolutions
# never go to YNNPACK, so they are unaffected.
CPU_CONVOLUTION_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}


@functools.cache
def _cpu_accepts(options: tuple) -> bool:
    """Whether this XLA:CPU compiles a program with ``options`` (an XLA without one of the flags
    refuses it); other compilation errors are raised."""
    try:
        on_cpu = jax.device_put(np.zeros((2,), np.float32), jax.local_devices(backend="cpu")[0])
        jax.jit(lambda x: x + 1).lower(on_cpu).compile(compiler_options=dict(options))
    except Exception as err:  # pylint: disable=broad-except
        if not any(name in str(err) for name, _ in options):
            raise
        return False
    return True


def compiler_options(platform: str) -> dict | None:
    """The compiler options for programs that run on ``platform`` ("cpu", "gpu", "tpu"):
    `CPU_CONVOLUTION_OPTIONS` on the CPU when this XLA accepts them (checked once per process by
    compiling a tiny program), else None (XLA's defaults)."""
    if platform != "cpu":
        return None
    options = tuple(sorted(CPU_CONVOLUTION_OPTIONS.items()))
    return dict(options) if _cpu_accepts(options) else None


__all__ = ["CPU_CONVOLUTION_OPTIONS", "compiler_options"]
