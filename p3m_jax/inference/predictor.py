"""`Predictor`: a P3M-Net with its variables in eval mode, running ahead-of-time compiled forward passes
shared by every Predictor of the same model."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from p3m_jax.common.compile_options import compiler_options
from p3m_jax.models import OUTPUT_NAMES, build_model, check_input_shape
from p3m_jax.weights import model_checkpoint
from p3m_jax.weights.initialize import model_config_key, random_variables


# Compiled forward passes shared by every Predictor of the same model (arch, options, dtype), variables
# structure and input shape: `predict`, `evaluate` and the training loop's validation, which builds a new
# Predictor for every evaluation, compile a shape once per process (and once per machine with JAX's
# persistent cache on).
_EXECUTABLES: dict[tuple, Any] = {}
_EXECUTABLES_LOCK = threading.Lock()
# Programs being compiled in the background (`Predictor.compile_programs(..., wait=False)`), by the same key.
# One compiler thread, one program at a time: two XLA:CPU compilations side by side took longer than the
# same two one after the other, since each already spreads its code generation over the cores. Tracing and
# lowering (Python) run on a thread of their own, so that the next program lowers while the one before it
# compiles: XLA's compiler mostly keeps one core busy and releases the GIL.
_PENDING: dict[tuple, concurrent.futures.Future] = {}


@functools.cache
def _background_threads() -> tuple[concurrent.futures.Executor, concurrent.futures.Executor]:
    """(lowerer, compiler): made at the first background compile, not at import."""
    return (
        concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="p3m-lower"),
        concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="p3m-compile"),
    )


def compile_inference_program(lowered) -> Any:
    """Compiles a lowered forward pass with the compiler options of the platform it runs on
    (`p3m_jax.common.compile_options`: on the CPU, XLA's own convolutions rather than YNNPACK's)."""
    return lowered.compile(compiler_options=compiler_options(jax.devices()[0].platform))


def clear_compiled_programs() -> None:
    """Drops the forward programs this process has compiled (memory); they are compiled again, or read
    from JAX's persistent compilation cache when it is on, at their next use. A program still compiling
    in the background is kept when it finishes."""
    with _EXECUTABLES_LOCK:
        _EXECUTABLES.clear()


def _output_names(outputs: Sequence[str] | None) -> tuple[str, ...]:
    if outputs is None:
        return tuple(OUTPUT_NAMES)
    names = tuple(dict.fromkeys(outputs))
    unknown = [n for n in names if n not in OUTPUT_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown outputs {unknown or names}; expected some of {OUTPUT_NAMES}")
    return names


def _variables_signature(variables) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    return treedef, tuple((tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves)


class Predictor:
    """A P3M-Net with its variables, run in eval mode (BatchNorm running statistics).

    ``forward`` runs an ahead-of-time compiled program per input shape (and set of outputs), compiled on
    first use (or ahead of it by `compile_programs`, in the background) and shared with every other Predictor of the
    same model.
    """

    def __init__(
        self,
        arch: str,
        variables: Any,
        *,
        dtype=jnp.float32,
        options: dict | None = None,
        source: str = "weights given in memory",
    ):
        self.arch = arch
        self.source = source  # where the weights came from, for `describe`
        self.options = dict(options or {})
        self.dtype = dtype = jnp.dtype(dtype)
        if dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        self.model = build_model(arch, dtype=dtype, **self.options)
        self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
        self._model_key = model_config_key(arch, dtype, self.options) + (_variables_signature(self.variables),)

    def set_variables(self, variables: Any) -> None:
        """Replaces the weights by ``variables`` of the same shapes and dtypes (the compiled forward passes
        are reused): a training run's validation predictor gets each new state this way."""
        variables = jax.tree_util.tree_map(jnp.asarray, variables)
        if _variables_signature(variables) != _variables_signature(self.variables):
            raise ValueError("set_variables: the new variables differ in shapes or dtypes from the predictor's")
        self.variables = variables

    def _program(self, names: tuple[str, ...]):
        model = self.model

        def apply(variables, x):
            out = model.apply(variables, x, train=False)
            # Only the requested outputs: XLA drops whatever else would have been computed for them
            # alone (HYBRID needs `global` from one pass and `local` from the other).
            return {k: out[k] for k in names}

        return jax.jit(apply)

    def compile_programs(
        self, programs: Iterable[tuple[tuple[int, ...], Sequence[str] | None]], *, wait: bool = True
    ) -> None:
        """Compiles the forward pass for each ((N, H, W, 3) input shape, outputs) pair not compiled yet.
        ``outputs`` names the outputs wanted (None: all six).

        The programs compile in the order given, one after another, on a background thread shared by
        every Predictor (each one is lowered on another thread while the one before it compiles); a
        program already compiling is not compiled twice. With ``wait=False`` this
        returns at once and `forward` waits for the program it needs, so the first pass of a strategy
        runs while the next one's program compiles (HYBRID: the full-size program compiles while the
        half-size pass runs). Errors of a compilation are raised by whoever waits for it.
        """
        futures = []
        for shape, outputs in programs:
            request = (tuple(int(d) for d in shape), _output_names(outputs))
            check_input_shape(request[0])
            key = self._model_key + request
            with _EXECUTABLES_LOCK:
                if key in _EXECUTABLES:
                    continue
                future = _PENDING.get(key)
                if future is None:
                    lowerer, compiler = _background_threads()
                    lowering = lowerer.submit(self._lower, request)
                    future = _PENDING[key] = compiler.submit(self._compile, key, lowering)
            futures.append(future)
        if wait:
            for future in futures:
                future.result()

    def _lower(self, request: tuple):
        shape, names = request
        return self._program(names).lower(self.variables, jax.ShapeDtypeStruct(shape, jnp.float32))

    def _compile(self, key: tuple, lowering: concurrent.futures.Future) -> None:
        try:
            executable = compile_inference_program(lowering.result())  # a lowering error is raised here
            with _EXECUTABLES_LOCK:
                _EXECUTABLES.setdefault(key, executable)
        finally:
            with _EXECUTABLES_LOCK:
                _PENDING.pop(key, None)

    @classmethod
    def random(cls, arch: str, seed: int = 0, *, dtype=jnp.float32, **options) -> "Predictor":
        """A predictor with freshly initialized (untrained) weights, for tests and benchmarks."""
        return cls(arch, random_variables(arch, seed, dtype=dtype, options=options), dtype=dtype, options=options)

    def describe(self) -> str:
        """What is loaded, for a command's first line: ``resnet34 (float32) from model checkpoint ...``."""
        return f"{self.arch} ({self.dtype.name}) from {self.source}"

    def forward(self, x, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Runs the network on a batch.

        Args:
          x: float32 (N, H, W, 3), RGB already ImageNet-normalized, H and W multiples of 32.
          outputs: the names of the outputs wanted (default: all six); the others are not computed
            where the network allows it (each set is its own compiled program).

        Returns:
          The outputs as numpy float32 arrays: ``global`` (N, H, W, 3) logits, ``local`` and
          ``fusion`` (N, H, W, 1) alpha, ``side2``/``side1``/``side0`` logits.
        """
        x = np.asarray(x, dtype=np.float32)
        check_input_shape(x.shape)
        key = self._model_key + (x.shape, _output_names(outputs))
        executable = _EXECUTABLES.get(key)
        if executable is None:
            self.compile_programs([(x.shape, outputs)])  # or waits for it, when it is compiling already
            executable = _EXECUTABLES[key]
        out = executable(self.variables, x)
        return {k: np.asarray(v, np.float32) for k, v in out.items()}

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> str:
        """Writes the variables as a p3m-jax model checkpoint (see `p3m_jax.weights.model_checkpoint`)."""
        return model_checkpoint.save_model_checkpoint(
            path, self.arch, self.variables, options=self.options, overwrite=overwrite
        )
