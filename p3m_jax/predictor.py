"""Inference-ready P3M-Net: `load_pretrained` and the `Predictor` it returns."""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from p3m_jax import checkpoints
from p3m_jax.compile_options import compiler_options
from p3m_jax.models import ARCHITECTURES, OUTPUT_NAMES, build_model, check_input_shape, init_variables
from p3m_jax.weights import torch_import


def init_key(seed: int) -> jax.Array:
    """PRNG key for weight initialization.

    The "rbg" generator compiles 2-3x faster than the default threefry on XLA:CPU, where
    compiling the ~400 random initializers of a P3M-Net otherwise dominates start-up time.
    """
    return jax.random.key(seed, impl="rbg")


# What `load_pretrained` raises for weights that are missing (FileNotFoundError), foreign or corrupt
# (ValueError, including `torch_import.CheckpointImportError`) or a .pth without PyTorch (ImportError):
# the command-line tools report these as one line.
CHECKPOINT_ERRORS = (FileNotFoundError, ValueError, ImportError)


def _is_abstract(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def _model_config_key(arch: str, dtype, options: dict) -> tuple:
    """What identifies a built model: its arch, compute dtype and `build_model` options."""
    return arch, jnp.dtype(dtype).name, json.dumps(options, sort_keys=True, default=str)


# Jitted initializers by `_model_config_key`: compiling one (the initializers and a forward pass) takes
# seconds, and jit reuses the compiled program only for the same function.
_INITIALIZERS: dict[tuple, Any] = {}
_INITIALIZERS_LOCK = threading.Lock()


def random_variables(arch: str, seed: int = 0, *, dtype=jnp.float32, options: dict | None = None):
    """Freshly initialized variables of ``build_model(arch, dtype=dtype, **options)`` from ``init_key(seed)``;
    the initializer is compiled once per process for each model."""
    options = dict(options or {})
    key = _model_config_key(arch, dtype, options)
    with _INITIALIZERS_LOCK:
        initializer = _INITIALIZERS.get(key)
        if initializer is None:
            model = build_model(arch, dtype=dtype, **options)
            initializer = _INITIALIZERS[key] = jax.jit(lambda r: init_variables(model, r))
    return initializer(init_key(seed))


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
_COMPILER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="p3m-compile")
_LOWERER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="p3m-lower")


def compile_inference_program(lowered) -> Any:
    """Compiles a lowered forward pass with the compiler options of the platform it runs on
    (`p3m_jax.compile_options`: on the CPU, XLA's own convolutions rather than YNNPACK's)."""
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

    def __init__(self, arch: str, variables: Any, *, dtype=jnp.float32, options: dict | None = None):
        self.arch = arch
        self.options = dict(options or {})
        self.dtype = dtype = jnp.dtype(dtype)
        if dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        self.model = build_model(arch, dtype=dtype, **self.options)
        self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
        self._model_key = _model_config_key(arch, dtype, self.options) + (_variables_signature(self.variables),)

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
                    lowering = _LOWERER.submit(self._lower, request)
                    future = _PENDING[key] = _COMPILER.submit(self._compile, key, lowering)
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
        """Writes the variables as a p3m-jax model checkpoint (see `p3m_jax.checkpoints`)."""
        return checkpoints.save_model_checkpoint(
            path, self.arch, self.variables, options=self.options, overwrite=overwrite
        )


def variables_from_torch(
    path: str | os.PathLike,
    arch: str,
    *,
    backbone_only: bool = False,
    options: dict | None = None,
    seed: int = 0,
    verbose: bool = False,
):
    """Reads an authors' ``.pth`` and converts it for ``arch``; returns ``(variables, report)``.

    Variables the checkpoint does not carry but may legitimately lack (non-trained constants;
    with ``backbone_only`` the whole decoder) are drawn by the model's init with ``seed``.
    """
    state_dict = torch_import.read_torch_checkpoint(path)
    model = build_model(arch, **(options or {}))
    init = lambda r: init_variables(model, r)  # noqa: E731
    reference = jax.eval_shape(init, init_key(seed))
    variables, report = torch_import.convert_state_dict(
        state_dict, arch, reference, backbone_only=backbone_only, source=os.fspath(path)
    )
    if any(_is_abstract(v) for v in jax.tree_util.tree_leaves(variables)):
        fresh = random_variables(arch, seed, options=options)
        variables = jax.tree_util.tree_map(lambda v, f: np.asarray(f) if _is_abstract(v) else v, variables, fresh)
    if verbose:
        print(report.summary())
    return variables, report


def _load_training_workdir(workdir: str, arch: str | None, dtype) -> Predictor:
    """The best checkpoint of a training workdir (see `p3m_jax.train.checkpointing`)."""
    import json  # pylint: disable=import-outside-toplevel

    from p3m_jax.train.checkpointing import (  # pylint: disable=import-outside-toplevel
        CHECKPOINT_SUBDIR,
        RUN_CONFIG_FILE,
        restore_variables,
    )

    config_path = os.path.join(workdir, RUN_CONFIG_FILE)
    try:
        with open(config_path, encoding="utf-8") as f:
            run = json.load(f)
        saved_arch, options = run["arch"], dict(run.get("model_options", {}))
    except (ValueError, KeyError) as e:
        raise ValueError(f"corrupt training config {config_path}: {e}") from e
    if arch is not None and arch != saved_arch:
        raise ValueError(f"{workdir} trained a {saved_arch} model, not {arch}")
    _, variables = restore_variables(os.path.join(workdir, CHECKPOINT_SUBDIR))
    return Predictor(saved_arch, variables, dtype=dtype, options=options)


def load_pretrained(
    path: str | os.PathLike, arch: str | None = None, *, dtype=jnp.float32, verbose: bool = False
) -> Predictor:
    """Loads trained P3M-Net weights for inference.

    Args:
      path: a p3m-jax model checkpoint directory (written by ``python -m p3m_jax.convert`` or
        `Predictor.save`), a training workdir of ``python -m p3m_jax.main`` (its best checkpoint
        by validation SAD, or the latest when none was evaluated), or an authors' PyTorch ``.pth`` (``{'state_dict': ...}`` or a bare
        state dict; reading it needs PyTorch).
      arch: "resnet34", "swin_t" or "vitae_s". Required for a ``.pth``; for a p3m-jax
        checkpoint it is read from the checkpoint (and checked if given).
      dtype: compute dtype, ``jnp.float32`` (default) or ``jnp.bfloat16``.
      verbose: print what was loaded.

    Returns:
      A `Predictor`: ``predictor.forward(x)`` gives the six outputs as numpy arrays.
    """
    if arch is not None and arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    path = os.fspath(path)
    if os.path.isdir(path) and not checkpoints.is_model_checkpoint(path):
        from p3m_jax.train.checkpointing import CHECKPOINT_SUBDIR  # pylint: disable=import-outside-toplevel

        if os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
            return _load_training_workdir(path, arch, dtype)
    if os.path.isdir(path):
        saved_arch, options, variables = checkpoints.load_model_checkpoint(path)
        if arch is not None and arch != saved_arch:
            raise ValueError(f"{path} holds a {saved_arch} model, not {arch}")
        return Predictor(saved_arch, variables, dtype=dtype, options=options)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if arch is None:
        raise ValueError(f"{path} looks like a PyTorch checkpoint: pass arch= (one of {sorted(ARCHITECTURES)})")
    variables, _ = variables_from_torch(path, arch, verbose=verbose)
    return Predictor(arch, variables, dtype=dtype)
