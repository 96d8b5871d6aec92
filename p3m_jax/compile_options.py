"""XLA compiler options for the training, evaluation and inference programs on the CPU."""

from __future__ import annotations

import functools

import jax
import numpy as np

# XLA:CPU compiles convolutions into YNNPACK calls by default; with this option it keeps YNNPACK
# for matmuls and reductions and compiles convolutions with its own (Eigen) kernels, which were
# faster here. 2-core AVX2 CPU, interleaved A/B in one process, medians:
# - inference, HYBRID's full-size pass at 1056x1600: ResNet-34 6.13 s vs 6.76 s, Swin-T 9.59 s vs
#   10.24 s, ViTAE-S 43.2 s vs 43.0 s (outputs within 3e-6);
# - the float32 train step at 512x512, batch 1 (8 or 6 steps each): ResNet-34 4.75 s vs 5.09 s,
#   ViTAE-S 7.39 s vs 7.62 s, Swin-T 7.10 s vs 7.06 s (losses equal to float rounding).
# A 3x3 convolution from 64 to 64 channels alone: 10 ms vs 15 ms at 128x128, 39 ms vs 49 ms at
# 256x256. The CPU's bfloat16 convolutions never go to YNNPACK, so they are unaffected.
CPU_CONVOLUTION_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                           "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


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
