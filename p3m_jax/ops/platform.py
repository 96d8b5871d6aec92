"""The one switch between the forms written for XLA:CPU and the standard ops of GPUs and TPUs.

Every op with a CPU form (the 'same' convolution, LayerNorm, softmax attention) goes through
`by_platform`. A program lowered for XLA:CPU runs the CPU forms (rewrites and backward passes written
by hand, query chunking); one lowered for a GPU or a TPU runs the standard ones (XLA's convolution, a
plain expression differentiated by JAX, `jax.nn.dot_product_attention`). The choice is made when the
program is lowered (`lax.platform_dependent`), not when it is traced, so a step traced on a CPU
machine and compiled ahead of time for a TPU slice gets the TPU's forms.

Exported programs are traced inside `portable_program()`: they take each op's portable form on every
platform, since the runtime that will execute them is not known.
"""

from __future__ import annotations

from typing import Callable

import jax

from p3m_jax.ops.switch import TraceSwitch

_PORTABLE = TraceSwitch()


def portable_program():
    """Within this context, ops trace their portable form, whatever platform lowers the program (exports)."""
    return _PORTABLE.turned_on()


def is_portable() -> bool:
    return _PORTABLE.on


def by_platform(*args, cpu: Callable, accelerator: Callable, portable: Callable | None = None):
    """``cpu(*args)`` on XLA:CPU, ``accelerator(*args)`` on GPUs and TPUs; inside `portable_program()`,
    ``portable(*args)`` (the accelerator form unless given)."""
    if is_portable():
        return (portable or accelerator)(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=accelerator)
