"""A trained network out of Python: StableHLO (`jax.export`) and ONNX (`jax2onnx`) files, and predictors
that run them with the `Predictor.forward` interface (so RESIZE, HYBRID, `evaluate` and `predict` take them).

Both files hold the inference program: BatchNorm's running statistics, XLA's own convolution (traced
inside `ops.platform.portable_program`, not the CPU rewrites), float32, the weights as constants.

StableHLO (`.stablehlo`, an `.npz` with the serialized `jax.export.Exported` and a JSON metadata entry):
  input  (N, H, W, 3) float32 NHWC, RGB in [0, 1] normalised with ImageNet's mean and std;
  output a dict of the exported outputs, NHWC, as `Predictor.forward`;
  shapes N symbolic; H and W symbolic multiples of 32 where the network lowers so (ResNet-34), else the
         fixed size given (Swin-T, ViTAE-S: their window masks and attention chunks need static sizes);
  one file for cpu, cuda and tpu.
ONNX (`.onnx`, opset of jax2onnx):
  input  `image`, (N, 3, H, W) float32 NCHW, normalised as above;
  output `fusion` (N, 1, H, W) alpha in [0, 1] first, then `global` (N, 3, H, W) logits, `local`
         (N, 1, H, W), in that order, by name;
  shapes fixed (N, H, W) chosen at export: jax2onnx cannot carry the symbolic sizes of this network.
Each file carries its metadata (arch, input convention, size rule, versions); a wrong input shape
raises `ValueError` saying the rule.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import logging
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from p3m_jax.common import storage
from p3m_jax.common.fileio import atomic_write
from p3m_jax.models import OUTPUT_NAMES
from p3m_jax.ops.platform import portable_program
from p3m_jax.ops.pooling_primitives import pooling_primitives

FORMATS = ("stablehlo", "onnx")
FORMAT_VERSION = 1
PLATFORMS = ("cpu", "cuda", "tpu")
ONNX_OUTPUTS = ("fusion", "global", "local")
NHWC_INPUT = "float32 (N, H, W, 3) NHWC RGB in [0, 1], normalised: (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]"
NCHW_INPUT = "float32 (N, 3, H, W) NCHW RGB in [0, 1], normalised: (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]"


class ExportError(RuntimeError):
    """The network could not be exported in the form asked for."""


def _package_version() -> str:
    try:
        return importlib.metadata.version("p3m-jax")
    except importlib.metadata.PackageNotFoundError:  # a checkout that is not installed
        return "unknown"


def _metadata(predictor, fmt: str, input_convention: str, batch, height, width, outputs) -> dict:
    return {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "arch": predictor.arch,
        "model_options": predictor.options,
        "source": predictor.source,
        "input": input_convention,
        "batch": batch,
        "height": height,
        "width": width,
        "size_rule": "H and W positive multiples of 32"
        + ("" if height is None else f"; this file: exactly {height}x{width}")
        + ("" if batch is None else f"; batch exactly {batch}"),
        "outputs": list(outputs),
        "p3m_jax_version": _package_version(),
        "jax_version": jax.__version__,
    }


def _apply_fn(predictor, outputs):
    model = predictor.model

    def apply(variables, x):
        out = model.apply(variables, x, train=False)
        return {name: out[name].astype(jnp.float32) for name in outputs}

    return apply


# ------------------------------------------------------------------------------------------ StableHLO
def export_stablehlo(
    predictor, path, *, size: tuple[int, int] | None = None, outputs: Sequence[str] = OUTPUT_NAMES
) -> dict:
    """Writes the network as a StableHLO file; returns its metadata.

    `size` None: symbolic batch and spatial sizes, where the network lowers so, else an ExportError
    asking for a size; a (height, width): those sizes, symbolic batch."""
    outputs = tuple(outputs)
    if size is None:
        spec, height, width = "b, 32*h, 32*w, 3", None, None
    else:
        height, width = _check_size(size)
        spec = f"b, {height}, {width}, 3"
    shape = jax.export.symbolic_shape(spec)
    try:
        with portable_program():
            exported = jax.export.export(jax.jit(_apply_fn(predictor, outputs)), platforms=PLATFORMS)(
                predictor.variables, jax.ShapeDtypeStruct(shape, jnp.float32)
            )
    except Exception as error:  # shape polymorphism fails in several ways (tracer bools, inconclusive dims)
        if size is None:
            raise ExportError(
                f"{predictor.arch} does not lower with symbolic image sizes ({type(error).__name__}); "
                f"export it at a fixed size (--size HxW)"
            ) from error
        raise
    metadata = _metadata(predictor, "stablehlo", NHWC_INPUT, None, height, width, outputs)
    # The variables are the exported function's first argument: they travel in the file too.
    leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(predictor.variables)]
    arrays = {f"variable_{i:05d}": leaf for i, leaf in enumerate(leaves)}
    with atomic_write(path, "wb") as handle:
        np.savez(
            handle,
            exported=np.frombuffer(bytes(exported.serialize()), np.uint8),
            metadata=np.frombuffer(json.dumps(metadata).encode(), np.uint8),
            **arrays,
        )
    return metadata


def _check_size(size) -> tuple[int, int]:
    height, width = (int(size[0]), int(size[1]))
    if height < 32 or width < 32 or height % 32 or width % 32:
        raise ValueError(f"size {height}x{width}: height and width must be positive multiples of 32")
    return height, width


class ExportedPredictor:
    """Runs a StableHLO or ONNX file with `Predictor.forward`'s interface (NHWC in, NHWC out)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not storage.as_path(self.path).is_file():
            raise FileNotFoundError(f"no exported model at {self.path}")
        # A gs:// file is read once into memory; a local one is opened by path.
        self._file = storage.resolve(self.path).read_bytes() if storage.is_remote(self.path) else self.path
        if self.path.endswith(".onnx"):
            self._load_onnx()
        else:
            self._load_stablehlo()
        self.arch = self.metadata["arch"]
        self.source = f"{self.metadata['format']} file {self.path}"

    def _load_stablehlo(self):
        try:
            with np.load(io.BytesIO(self._file) if isinstance(self._file, bytes) else self._file) as data:
                self.metadata = json.loads(bytes(data["metadata"]).decode())
                self._exported = jax.export.deserialize(bytearray(data["exported"].tobytes()))
                names = sorted(k for k in data.files if k.startswith("variable_"))
                leaves = [jnp.asarray(data[k]) for k in names]
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"{self.path} is not a p3m-jax StableHLO file: {error}") from None
        # in_tree is ((variables, image), {}): the variables' structure is the first positional argument's.
        treedef = self._exported.in_tree.children()[0].children()[0]
        variables = jax.tree_util.tree_unflatten(treedef, leaves)
        calls = {}  # one program per set of wanted outputs: XLA drops what the others need

        def run(x, wanted):
            if wanted not in calls:
                calls[wanted] = jax.jit(lambda v, x: {k: self._exported.call(v, x)[k] for k in wanted})
            return {k: np.asarray(v) for k, v in calls[wanted](variables, x).items()}

        self._run = run

    def _load_onnx(self):
        import onnxruntime  # noqa: PLC0415  (an optional dependency: the export extra)

        try:
            full = onnxruntime.InferenceSession(self._file, providers=["CPUExecutionProvider"])
            self.metadata = json.loads(full.get_modelmeta().custom_metadata_map["p3m_jax"])
        except Exception as error:  # onnxruntime raises its own exception types
            raise ValueError(f"{self.path} is not a p3m-jax ONNX file: {error}") from None
        names = tuple(o.name for o in full.get_outputs())
        sessions = {names: full}

        def run(x, wanted):
            # onnxruntime runs every node of a graph whichever outputs are asked for, so a set of outputs
            # that is not all of them (each pass of HYBRID wants one) runs the part of the graph they need.
            key = tuple(name for name in names if name in wanted)
            if key not in sessions:
                import onnx  # noqa: PLC0415  (the export extra, as onnxruntime)
                import onnx.utils  # noqa: PLC0415

                whole = onnx.load(io.BytesIO(self._file) if isinstance(self._file, bytes) else self._file)
                part = onnx.utils.Extractor(whole).extract_model(["image"], list(key))
                sessions[key] = onnxruntime.InferenceSession(
                    part.SerializeToString(), providers=["CPUExecutionProvider"]
                )
            values = sessions[key].run(None, {"image": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})
            return {name: value.transpose(0, 2, 3, 1) for name, value in zip(key, values)}

        self._run = run

    def describe(self) -> str:
        return f"{self.arch} ({self.metadata['format']}) from {self.path}"

    def check_shape(self, shape) -> None:
        """ValueError saying the size rule when `shape` breaks it: (N, H, W, 3), H and W multiples of 32, and
        for a fixed-size file at most its size (smaller inputs are padded up to it)."""
        m = self.metadata
        ok = len(shape) == 4 and shape[3] == 3 and all(side >= 32 and side % 32 == 0 for side in shape[1:3])
        rule = "H and W positive multiples of 32"
        if m["height"] is not None:
            ok = ok and shape[1] <= m["height"] and shape[2] <= m["width"]
            # The file's own rule says "exactly": this predictor pads smaller inputs, and larger ones need
            # another file (what a newcomer with photos larger than the file needs to know).
            rule += (
                f", at most {m['height']}x{m['width']}, this file's fixed size (smaller inputs are padded up to "
                f"it); larger photos need a StableHLO file (any size for ResNet-34) or an export at a larger --size"
            )
        if not ok:
            raise ValueError(f"{self.path}: input {tuple(shape)} breaks the size rule: (N, H, W, 3) with {rule}")

    def forward(self, x, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The outputs (NHWC numpy float32) of a normalised (N, H, W, 3) batch. A fixed-size file takes
        smaller inputs padded up to its size (symmetric reflection, as `evaluate`'s buckets) and crops
        the outputs back; a fixed batch is run image by image."""
        x = np.asarray(x, np.float32)
        self.check_shape(x.shape)
        wanted = tuple(outputs) if outputs is not None else tuple(self.metadata["outputs"])
        missing = [name for name in wanted if name not in self.metadata["outputs"]]
        if missing:
            raise ValueError(f"{self.path} has no output {missing}; it has {self.metadata['outputs']}")
        m = self.metadata
        n, height, width = x.shape[:3]
        if m["height"] is not None and (height, width) != (m["height"], m["width"]):
            pad = ((0, 0), (0, m["height"] - height), (0, m["width"] - width), (0, 0))
            x = np.pad(x, pad, mode="symmetric")
        if m["batch"] is not None and n % m["batch"]:  # a fixed batch: the last one filled with copies
            x = np.concatenate([x, np.repeat(x[-1:], m["batch"] - n % m["batch"], axis=0)])
        batches = [x] if m["batch"] is None else [x[i : i + m["batch"]] for i in range(0, len(x), m["batch"])]
        results = [self._run(batch, wanted) for batch in batches]
        return {
            name: np.concatenate([np.asarray(r[name], np.float32) for r in results])[:n, :height, :width]
            for name in wanted
        }


# ------------------------------------------------------------------------------------------------ ONNX
def export_onnx(
    predictor, path, *, size: tuple[int, int] = (512, 512), batch: int = 1, outputs: Sequence[str] = ONNX_OUTPUTS
) -> dict:
    """Writes the network as an ONNX file (fixed batch and size); returns its metadata."""
    import onnx  # noqa: PLC0415  (optional dependencies: the export extra)

    height, width = _check_size(size)
    outputs = tuple(outputs)
    if not outputs or outputs[0] != "fusion" or any(name not in OUTPUT_NAMES for name in outputs):
        raise ValueError(f"ONNX outputs must start with 'fusion' and name outputs of {OUTPUT_NAMES}, got {outputs}")
    apply = _apply_fn(predictor, outputs)
    variables = predictor.variables

    def network(image):  # NCHW in and out, as ONNX runtimes and rembg expect
        out = apply(variables, jnp.transpose(image, (0, 2, 3, 1)))
        return tuple(jnp.transpose(out[name], (0, 3, 1, 2)) for name in outputs)

    model = onnx_model(network, [(batch, 3, height, width)], what=predictor.arch)
    _rename(
        model.graph, {model.graph.input[0].name: "image"} | dict(zip((o.name for o in model.graph.output), outputs))
    )
    metadata = _metadata(predictor, "onnx", NCHW_INPUT, batch, height, width, outputs)
    entry = model.metadata_props.add()
    entry.key, entry.value = "p3m_jax", json.dumps(metadata)
    model.doc_string = f"P3M-Net ({predictor.arch}) portrait matting; input {NCHW_INPUT}; outputs {', '.join(outputs)}"
    onnx.checker.check_model(model)
    with atomic_write(path, "wb") as handle:
        handle.write(model.SerializeToString())
    return metadata


def onnx_model(fn, input_shapes, *, what: str):
    """``fn`` (float32 arrays in and out) as an ONNX ModelProto, traced as `export_onnx` traces the
    network: XLA's own convolutions, the poolings as ONNX's MaxPool / MaxUnpool. ``what`` names it in
    the ExportError raised when jax2onnx cannot convert it."""
    # jax2onnx prints its progress and the plugins it could not load: kept out of the command's output,
    # and shown when the conversion fails.
    chatter = io.StringIO()
    # onnx_ir warns of values of unknown type (ONNX's checker passes the model); jax2onnx logs the plugins
    # it cannot load on this JAX (dm_pix's), which this network does not use.
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "jax2onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with (
            portable_program(),
            pooling_primitives(),
            contextlib.redirect_stdout(chatter),
            contextlib.redirect_stderr(chatter),
        ):
            from jax2onnx import to_onnx  # noqa: PLC0415  (optional: the export extra; prints while loading)

            # The ONNX lowerings of the pooling primitives (importing it registers the jax2onnx plugins).
            from p3m_jax.inference import onnx_pooling  # noqa: F401, PLC0415

            return to_onnx(fn, list(input_shapes), return_mode="proto")
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] in ("jax2onnx", "onnx_ir", "onnx"):
            raise  # the export extra is not installed: the command says how to install it
        raise ExportError(f"jax2onnx could not convert {what}: {type(error).__name__}: {error}") from error
    except Exception as error:  # jax2onnx raises many types for an unsupported operation
        raise ExportError(
            f"jax2onnx could not convert {what}: {type(error).__name__}: {error}\n{chatter.getvalue()[-2000:]}"
        ) from error
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _rename(graph, names: dict) -> None:
    """Renames values of an ONNX graph everywhere they appear (inputs, outputs, nodes, value infos)."""
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(name, name) for name in node.input]
        node.output[:] = [names.get(name, name) for name in node.output]
