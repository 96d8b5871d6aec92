"""Reading a `jax.profiler` trace: the largest HLO ops, and the time per network part and pass
("forward encoder/layer1", "backward decoder/tfi_0", "loss and optimizer"...)."""

from __future__ import annotations

import collections
import functools
import gzip
import json
import pathlib
import re


def _trace_events(profile_dir: str) -> tuple[list[dict], dict]:
    """The duration events of the newest trace in ``profile_dir`` and its ``{pid: process
    name}`` (e.g. "/host:CPU", "/device:GPU:0"); empty if there is no trace."""
    paths = sorted(pathlib.Path(profile_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    return _load_trace(str(paths[-1])) if paths else ([], {})


@functools.lru_cache(maxsize=1)
def _load_trace(path: str) -> tuple[list[dict], dict]:
    # Cached: both summaries of one profiled step read the same (tens of MB) trace.
    events = json.load(gzip.open(path)).get("traceEvents", [])
    durations = [e for e in events if e.get("ph") == "X" and "dur" in e]
    names = {
        e.get("pid"): str((e.get("args") or {}).get("name", ""))
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    return durations, names


def top_ops_from_trace(profile_dir: str, top: int = 12) -> list[tuple[str, float]]:
    """Seconds per op category (the HLO op name without its numeric suffix) from the
    perfetto trace ``jax.profiler.trace`` wrote; the largest ``top``."""
    totals: dict[str, float] = collections.defaultdict(float)
    for e in _trace_events(profile_dir)[0]:
        name = str(e.get("name", ""))
        # HLO instructions are named like "convolution.12" or "loop_add_fusion.3".
        base = name.rsplit(".", 1)[0] if name.rsplit(".", 1)[-1].isdigit() else name
        totals[base] += e["dur"] / 1e6
    return sorted(totals.items(), key=lambda kv: -kv[1])[:top]


_HLO_OP_NAME = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', re.M)
# Call-path components that say how an op was produced, not where in the network it is.
_TRANSFORM_PREFIXES = (
    "jit(",
    "jvp(",
    "transpose(",
    "vmap(",
    "remat",
    "checkpoint",
    "cond",
    "branch_",
    "while",
    "body",
    "closed_call",
    "pjit",
)


def network_part(op_name: str) -> tuple[str, str]:
    """``(direction, part)`` of an HLO op from its ``op_name`` metadata (JAX's call path):
    direction "backward" for ops of the gradient (JAX's transpose pass), else "forward"; part
    the first two module levels under the network (``encoder/layer1``, ``decoder/tfi_0``),
    "network" for ops of its own body, or "loss and optimizer" for ops outside the network.
    A fused op's metadata may join several paths with ";": the first one counts."""
    op_name = op_name.split(";")[0]
    direction = "backward" if "transpose(" in op_name else "forward"
    if "P3MNet" not in op_name:
        return direction, "loss and optimizer"
    # The last component is the primitive (conv_general_dilated, add...), the rest modules.
    modules = [c for c in op_name.split("/")[:-1] if c and not c.startswith(_TRANSFORM_PREFIXES)]
    return direction, "/".join(modules[:2]) or "network"


def time_by_network_part(profile_dir: str, hlo_text: str, top_ops: int = 10) -> dict:
    """Where one profiled step's device time went, from the trace ``jax.profiler.trace`` wrote
    and the compiled program's HLO text (``compiled.as_text()``), which maps every HLO op to
    the module that emitted it.

    Returns ``{"parts": [(direction, part, seconds)], "ops": [(hlo_op, seconds, direction, part,
    primitive)]}``, largest first, from the trace events that name their HLO op (XLA:CPU's
    thunks, XLA:GPU's kernels; where a device's events name HLO ops, only those count, not the
    host's launches of them; a kernel inside a command buffer counts for its fusion, or as a
    "library kernel in command buffers" under its kernel name). Ops without ``op_name`` metadata
    (XLA made them: layout copies, some fusions) count as "no metadata (made by XLA)". Ops that
    run concurrently both count, so the sum can exceed the step time; empty lists if the trace
    names no HLO ops.
    """
    op_names = dict(_HLO_OP_NAME.findall(hlo_text))
    parts: dict[tuple[str, str], float] = collections.defaultdict(float)
    ops: dict[str, float] = collections.defaultdict(float)
    events, process_names = _trace_events(profile_dir)
    events = [e for e in events if (e.get("args") or {}).get("hlo_op")]
    on_device = [e for e in events if process_names.get(e.get("pid"), "").startswith("/device:")]
    library_kernels = set()
    for e in on_device or events:
        op = _hlo_op_of(e, op_names)
        if op is None:  # a cuDNN/cuBLAS kernel inside a command buffer: named by its kernel
            op = str(e.get("name", "")).split("<")[0].split("(")[0][:60]
            library_kernels.add(op)
        ops[op] += e["dur"] / 1e6
    located = {}
    for op, sec in ops.items():
        name = op_names.get(op)
        where = (
            network_part(name)
            if name
            else ("-", "library kernels in command buffers")
            if op in library_kernels
            else ("-", "no metadata (made by XLA)")
        )
        located[op] = (*where, name.rsplit("/", 1)[-1] if name else "-")
        parts[where] += sec
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:top_ops]
    return {
        "parts": sorted(((d, p, t) for (d, p), t in parts.items()), key=lambda r: -r[2]),
        "ops": [(op, sec, *located[op]) for op, sec in top],
    }


def _hlo_op_of(event: dict, op_names: dict) -> str | None:
    """The HLO op a trace event ran. XLA:GPU runs runs of thunks as command buffers (CUDA
    graphs): their kernels' events name the buffer ("command_buffer_12") as ``hlo_op`` and the
    kernel as the event's name, which for a fusion is the fusion's name with "_" for its "."
    ("loop_add_fusion_3" for loop_add_fusion.3). None for a kernel in a command buffer that is
    no fusion of the program (cuDNN's and cuBLAS's own kernels)."""
    op = event["args"]["hlo_op"]
    if op in op_names or not op.startswith("command_buffer"):
        return op
    kernel = str(event.get("name", ""))
    base, _, suffix = kernel.rpartition("_")
    for candidate in (kernel, f"{base}.{suffix}" if suffix.isdigit() else None):
        if candidate in op_names:
            return candidate
    return None
