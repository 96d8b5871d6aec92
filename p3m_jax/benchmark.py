"""Training-step benchmark: compile time, step time, throughput, FLOPs, MFU and memory.

    python -m p3m_jax.benchmark --arch resnet34 swin_t vitae_s --size 512 --batch 8 \
        --dtype float32 bfloat16 [--remat] [--param_sharding fsdp] \
        [--torch --authors_repo /tmp/p3m_authors] [--memory_only] [--profile DIR]
    python -m p3m_jax.benchmark --torch_only --torch_device cuda --torch_precision float32 float16 \
        --arch resnet34 --size 512 --batch 32 --authors_repo DIR

One row per (arch, dtype): the real `p3m_jax.train.step` train step (P3M loss, Adam, sharded
over all devices with `make_mesh`), median wall time of ``--repeats`` steps after a warm-up,
images/s (global and per device), FLOPs per step from XLA's cost analysis of the step lowered
for a GPU before optimisation (per device; see `step_flops`), the achieved TFLOP/s,
MFU against the device's nominal peak (table below; "unknown" elsewhere) and the compiled
program's memory (``memory_analysis()``: arguments + outputs + temporaries - aliased).

``--profile DIR`` runs one more step under ``jax.profiler`` (trace in DIR) and prints the op
time per category, per network part and pass (`time_by_network_part`: "forward encoder/layer1",
"backward decoder/tfi_0", "loss and optimizer"...) and the largest HLO ops.

``--memory_only`` compiles without running (abstract state and batch, nothing allocated): the
memory a per-device batch needs, e.g. ``--batch 32 --memory_only`` on a CPU.

``--torch`` times the authors' public PyTorch train step (their model from ``--authors_repo``,
a checkout of github.com/ViTAE-Transformer/P3M-Net imported at run time, never vendored; the
same losses written in PyTorch, Adam) on the same size and batch, float32 on the CPU by
default, alternating with our steps so both see the same machine load, and prints ours/theirs
(the PyTorch model's per-device batch; one device). ``--torch_only`` times only theirs, on
``--torch_device`` at each ``--torch_precision`` (float16: autocast, loss in float32): on a GPU,
run it in a process of its own, so that the two frameworks' allocators do not share the card.
The authors' code imports three helpers from ``timm`` (and torchvision in a utility module);
when those are not installed minimal stand-in modules are registered.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import json
import os
import pathlib
import re
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

# Nominal dense peak FLOP/s per device: (bfloat16, float32). GPUs: tensor-core bf16 and
# non-tensor-core fp32. TPUs: the MXU bf16 peak for both (XLA's default f32 matmul precision on
# TPU runs on the bf16 MXU). Matched on lowercase substrings of ``device_kind``, in order.
PEAK_FLOPS = (
    ("h100 pcie", "H100 PCIe", 756e12, 51.2e12),
    ("h100", "H100 SXM", 989.4e12, 66.9e12),
    ("h200", "H200", 989.4e12, 66.9e12),
    ("a100", "A100", 312e12, 19.5e12),
    ("v6 lite", "TPU v6e", 918e12, 918e12),
    ("v6e", "TPU v6e", 918e12, 918e12),
    ("v5 lite", "TPU v5e", 197e12, 197e12),
    ("v5e", "TPU v5e", 197e12, 197e12),
    ("v5p", "TPU v5p", 459e12, 459e12),
    ("v5", "TPU v5p", 459e12, 459e12),
    ("v4", "TPU v4", 275e12, 275e12),
)


# ------------------------------------------------------------------ device turns
# On a GPU lent for minutes, XLA:GPU's compilation (with its autotuning) takes most of the time.
# benchmarks/device_suite.py therefore starts several benchmark processes at once, so that they
# compile side by side, and then gives the device to one at a time for the timed part. It sets
# P3M_BENCH_TURN_DIR; outside the suite these two calls do nothing.
TURN_DIR_ENV = "P3M_BENCH_TURN_DIR"


def wait_for_device_turn(poll_s: float = 0.2) -> None:
    """Says this process is ready (compiled) and blocks until the suite gives it the device.

    Writes ``ready.<pid>`` in the folder named by P3M_BENCH_TURN_DIR and waits for
    ``turn.<pid>``; returns at once when the variable is unset or this process already has its turn.
    """
    folder = os.environ.get(TURN_DIR_ENV)
    if not folder:
        return
    turn = pathlib.Path(folder) / f"turn.{os.getpid()}"
    if turn.exists():
        return
    (pathlib.Path(folder) / f"ready.{os.getpid()}").touch()
    start = time.monotonic()
    while not turn.exists():
        time.sleep(poll_s)
    print(f"# waited {time.monotonic() - start:.0f}s for the device (other benchmarks were compiling "
          "or timing)", flush=True)


def end_device_turn() -> None:
    """Hands the device back to the suite (``done.<pid>``): the timed work on it is over."""
    folder = os.environ.get(TURN_DIR_ENV)
    if folder:
        (pathlib.Path(folder) / f"done.{os.getpid()}").touch()


def peak_flops(device_kind: str, dtype) -> float | None:
    """Nominal per-device peak FLOP/s for ``dtype`` on ``device_kind``; None when unknown."""
    kind = device_kind.lower()
    for key, _, bf16, f32 in PEAK_FLOPS:
        if key in kind:
            return bf16 if jnp.dtype(dtype) == jnp.bfloat16 else f32
    return None


def _flops_of(analysis) -> float:
    """The "flops" entry of an XLA cost analysis (a dict, or a list of one); NaN when absent."""
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def step_flops(step, abstract_state, abstract_batch, n_devices: int) -> float:
    """FLOPs per device of one train step: XLA's cost analysis of the step lowered for a GPU,
    before optimisation and partitioning (global, so divided by the devices).

    Not the compiled program's own analysis: XLA:GPU compiles convolutions to cuDNN custom
    calls, which its cost analysis counts as nothing (a ResNet-34 step at 512x512, batch 32,
    reported 0.28 of its 11 TFLOP on an H200), and on the CPU some convolution gradients run as
    loops over kernel taps (see `layers.same_conv`) whose bodies are counted once. The
    GPU lowering has every convolution and dot as one plain HLO op, on any backend."""
    lowered = step.trace(abstract_state, abstract_batch).lower(lowering_platforms=("cuda",))
    analysis = lowered.cost_analysis()
    if analysis is None:
        # jax answers None where the running backend is a PJRT plugin (the GPU one, whose
        # client cannot analyse an uncompiled module); the analysis needs no device, so the
        # host's CPU client does it.
        analysis = _host_cost_analysis(lowered)
    return _flops_of(analysis) / n_devices


def _host_cost_analysis(lowered) -> dict | None:
    """XLA's HLO cost analysis of ``lowered`` by the CPU client; None when jax lacks the hook
    (a private one: ``Lowered.cost_analysis`` does the same with the running backend)."""
    try:
        from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel
        module = lowered._lowering.hlo().as_hlo_module()  # pylint: disable=protected-access
        return _jax.hlo_module_cost_analysis(jax.local_devices(backend="cpu")[0].client, module)
    except Exception as err:  # pylint: disable=broad-except
        print(f"# no FLOP count: the host's cost analysis failed ({err!r})", flush=True)
        return None


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    get = lambda name: int(getattr(m, name, 0) or 0)
    out = {"argument": get("argument_size_in_bytes"), "output": get("output_size_in_bytes"),
           "temp": get("temp_size_in_bytes"), "alias": get("alias_size_in_bytes")}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def host_batch(batch: int, size: int, seed: int = 0) -> dict:
    """A random uint8 batch of the pipeline's host contract."""
    rng = np.random.default_rng(seed)
    u8 = lambda c: rng.integers(0, 256, (batch, size, size, c), dtype=np.uint8)
    return {"image": u8(3), "fg": u8(3), "bg": u8(3), "alpha": u8(1),
            "trimap": rng.choice(np.array([0, 128, 255], np.uint8), (batch, size, size, 1)),
            "has_fg_bg": np.ones(batch, bool)}


def bench_jax(arch: str, dtype, size: int, batch: int, repeats: int, remat: bool,
              param_sharding: str, memory_only: bool, profile_dir: str | None,
              other_step=None) -> dict:
    """Compiles and times our train step. With ``other_step`` (a callable running one step
    of another implementation), it is timed interleaved with ours, so both see the same
    machine load; its median lands in ``other_step_s``."""
    from p3m_jax.models import build_model
    from p3m_jax.train import (batch_sharding, create_train_state, make_mesh, make_optimizer,
                               make_train_step, state_shardings)

    mesh = make_mesh()
    n_dev = mesh.size
    model = build_model(arch, dtype=dtype, remat=remat)
    tx, lr = make_optimizer(None, 1000)
    make_state = lambda r: create_train_state(model, tx, r, 64)
    abstract = jax.eval_shape(make_state, jax.random.key(0))
    shardings = state_shardings(abstract, mesh, param_sharding)
    step = make_train_step(model, tx, mesh, shardings, lr)
    hb = host_batch(batch * n_dev, size)
    bsh = batch_sharding(mesh)
    abstract_state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh)
                      for k, v in hb.items()}
    t0 = time.perf_counter()
    compiled = step.lower(abstract_state, abstract_batch).compile()
    compile_s = time.perf_counter() - t0
    flops = step_flops(step, abstract_state, abstract_batch, n_dev)
    row = {"arch": arch, "dtype": jnp.dtype(dtype).name, "remat": remat, "devices": n_dev,
           "device_kind": jax.devices()[0].device_kind, "global_batch": batch * n_dev,
           "compile_s": compile_s, "flops": flops, "memory": _memory(compiled)}
    if memory_only:
        return row
    # Compiled before the device turn, so that a turn holds only the device work.
    init_state = jax.jit(make_state, out_shardings=shardings).lower(jax.random.key(0)).compile()
    wait_for_device_turn()
    state = init_state(jax.random.key(0))
    device_batch = jax.device_put(hb, bsh)
    state, metrics = compiled(state, device_batch)  # warm-up
    jax.block_until_ready(metrics)
    if other_step is not None:
        other_step()  # warm-up
    times, other_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, metrics = compiled(state, device_batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
        if other_step is not None:
            t0 = time.perf_counter()
            other_step()
            other_times.append(time.perf_counter() - t0)
    if other_times:
        row["other_step_s"] = statistics.median(other_times)
    if profile_dir:
        try:
            with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
                state, metrics = compiled(state, device_batch)
                jax.block_until_ready(metrics)
            end_device_turn()  # reading the trace needs only the host
            hlo_text = compiled.as_text()
            with gzip.open(os.path.join(profile_dir, "compiled_hlo.txt.gz"), "wt") as f:
                f.write(hlo_text)  # for reading the profile's fusions later
            row["profile"] = top_ops_from_trace(profile_dir)
            row["profile_by_part"] = time_by_network_part(profile_dir, hlo_text)
        except Exception as err:  # pylint: disable=broad-except
            # A profiler that cannot start here (e.g. no CUPTI) must not cost the timings.
            print(f"# profile of {arch} {jnp.dtype(dtype).name} failed: {err!r}", flush=True)
    end_device_turn()
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:  # GPU/TPU allocators; the CPU reports none
        row["peak_memory"] = int(stats["peak_bytes_in_use"])
        row["device_memory"] = int(stats.get("bytes_limit", 0))
    step_s = statistics.median(times)
    row.update(step_s=step_s, loss=float(metrics["loss"]),
               images_per_s=batch * n_dev / step_s, images_per_s_per_device=batch / step_s,
               tflops=row["flops"] / step_s / 1e12)
    peak = peak_flops(row["device_kind"], dtype)
    row["mfu"] = row["flops"] / step_s / peak if peak else None
    return row


def _trace_events(profile_dir: str) -> tuple[list[dict], dict]:
    """The duration events of the newest trace in ``profile_dir`` and its ``{pid: process
    name}`` (e.g. "/host:CPU", "/device:GPU:0"); empty if there is no trace."""
    paths = sorted(pathlib.Path(profile_dir).rglob("*.trace.json.gz"),
                   key=lambda p: p.stat().st_mtime)
    return _load_trace(str(paths[-1])) if paths else ([], {})


@functools.lru_cache(maxsize=1)
def _load_trace(path: str) -> tuple[list[dict], dict]:
    # Cached: both summaries of one profiled step read the same (tens of MB) trace.
    events = json.load(gzip.open(path)).get("traceEvents", [])
    durations = [e for e in events if e.get("ph") == "X" and "dur" in e]
    names = {e.get("pid"): str((e.get("args") or {}).get("name", "")) for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
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
_TRANSFORM_PREFIXES = ("jit(", "jvp(", "transpose(", "vmap(", "remat", "checkpoint", "cond",
                       "branch_", "while", "body", "closed_call", "pjit")


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
        where = (network_part(name) if name else
                 ("-", "library kernels in command buffers") if op in library_kernels else
                 ("-", "no metadata (made by XLA)"))
        located[op] = (*where, name.rsplit("/", 1)[-1] if name else "-")
        parts[where] += sec
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:top_ops]
    return {"parts": sorted(((d, p, t) for (d, p), t in parts.items()), key=lambda r: -r[2]),
            "ops": [(op, sec, *located[op]) for op, sec in top]}


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


# ------------------------------------------------------------------ the authors' PyTorch step

def _install_timm_stand_in():
    """The three timm helpers the authors' model imports (DropPath, to_2tuple, trunc_normal_)
    and register_model, when timm is not installed; and an empty ``torchvision.transforms``
    (their util.py imports it for data code the model does not use) when torchvision is not."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms})
    try:
        import timm  # noqa: F401
        return
    except ImportError:
        pass
    import torch

    class DropPath(torch.nn.Module):
        def __init__(self, drop_prob=0.0):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            if self.drop_prob == 0.0 or not self.training:
                return x
            keep = 1.0 - self.drop_prob
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
            return x * mask / keep

    def to_2tuple(x):
        return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
        return torch.nn.init.trunc_normal_(tensor, mean, std, a, b)

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    models = types.ModuleType("timm.models")
    models.layers, models.registry = layers, registry
    timm = types.ModuleType("timm")
    timm.models = models
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers,
                        "timm.models.registry": registry})


def _torch_loss(outputs, image, fg, bg, alpha, trimap):
    """DESIGN.md section 4's loss in PyTorch (NCHW), for a like-for-like step."""
    import torch
    import torch.nn.functional as F
    glob, local, fusion, s2, s1, s0 = outputs
    labels = torch.where(trimap == 0, 0, torch.where(trimap == 255, 2, 1)).long()[:, 0]
    ce = lambda logits: F.cross_entropy(logits, labels)
    l_global = ce(s2) + ce(s1) + ce(s0) + 3 * ce(glob)
    g = torch.exp(-(torch.arange(5.0, device=alpha.device) - 2) ** 2)
    k = (g[:, None] + g[None, :])
    k = (k / k.sum())[None, None]

    def pyramid(x):
        out = []
        for _ in range(5):
            f = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k)
            out.append(x - f)
            x = F.avg_pool2d(f, 2)
        return out + [x]

    def lap(p, a):
        return sum(F.l1_loss(u, v) for u, v in zip(pyramid(p), pyramid(a)))

    w = (trimap == 128).float()
    l_local = (torch.sqrt(((local - alpha) * w) ** 2 + 1e-12).sum() / (w.sum() + 1)
               + lap(local * w, alpha * w))
    l_fusion = torch.sqrt((fusion - alpha) ** 2 + 1e-12).mean() + lap(fusion, alpha)
    comp = fusion * fg + (1 - fusion) * bg
    l_comp = torch.sqrt((comp - image) ** 2 + 1e-12).sum() / fusion[:, 0].numel()
    return l_global / 6 + 2 * l_local + 3 * l_fusion + l_comp


def make_torch_step(arch: str, size: int, batch: int, authors_repo: str, device: str = "cpu",
                    precision: str = "float32"):
    """One training step (forward, the section-4 loss, backward, Adam) of the authors' public
    PyTorch P3M-Net, as a callable returning the loss.

    ``device`` is "cpu" or "cuda". ``precision`` "float16" runs the network under
    ``torch.autocast`` (float16, with a gradient scaler) and the loss in float32, as our
    bfloat16 step does; "float32" is the authors' own setting. On CUDA, cuDNN picks its
    algorithms by benchmark (``cudnn.benchmark``), as XLA:GPU autotunes ours."""
    import torch
    if precision not in ("float32", "float16"):
        raise ValueError(f"torch precision must be float32 or float16, got {precision!r}")
    core = str(pathlib.Path(authors_repo) / "core")
    if not pathlib.Path(core, "network").is_dir():
        raise FileNotFoundError(f"--authors_repo {authors_repo}: no core/network folder (a checkout of "
                                "github.com/ViTAE-Transformer/P3M-Net is expected)")
    if core not in sys.path:
        sys.path.insert(0, core)
    _install_timm_stand_in()
    from network import build_model as authors_build_model  # the authors' code, at run time
    name = {"resnet34": "r34", "swin_t": "swin", "vitae_s": "vitae"}[arch]
    kwargs = {"img_size": size} if arch == "swin_t" else {}
    # XLA:CPU flushes denormals to zero; PyTorch does not by default, and a randomly
    # initialised P3M-Net produces enough of them to slow its CPU kernels several times.
    torch.set_flush_denormal(True)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = authors_build_model(name, pretrained=False, **kwargs).train().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    amp = precision == "float16"
    scaler = torch.amp.GradScaler(device, enabled=amp)
    hb = host_batch(batch, size)
    mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    norm = lambda a: ((nchw(a).float() / 255 - mean) / std).to(device)
    image, fg, bg = norm(hb["image"]), norm(hb["fg"]), norm(hb["bg"])
    alpha, trimap = (nchw(hb["alpha"]).float() / 255).to(device), nchw(hb["trimap"]).float().to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.float16, enabled=amp):
            outputs = model(image)
        loss = _torch_loss([o.float() for o in outputs], image, fg, bg, alpha, trimap)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return float(loss.detach())  # waits for the device

    return step


def bench_torch(arch: str, size: int, batch: int, repeats: int, authors_repo: str, device: str,
                precision: str) -> dict:
    """Times the authors' step alone (``--torch_only``): median of ``repeats`` after two warm-ups,
    images/s and, on CUDA, the peak memory PyTorch allocated."""
    import torch
    wait_for_device_turn()  # before the model takes device memory
    step = make_torch_step(arch, size, batch, authors_repo, device, precision)
    row = {"arch": arch, "impl": "authors_pytorch", "device": device, "precision": precision,
           "batch": batch}
    try:
        for _ in range(2):
            step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as err:
        row["error"] = f"out of memory: {str(err).splitlines()[0]}"
        return row
    row.update(step_s=statistics.median(times), loss=loss,
               images_per_s=batch / statistics.median(times))
    if device == "cuda":
        row["peak_memory"] = int(torch.cuda.max_memory_allocated())
    return row


# ------------------------------------------------------------------ CLI

def _fmt_bytes(n):
    return f"{n / 2**30:.2f}G" if n else "-"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["resnet34", "swin_t", "vitae_s"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="per-device batch")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--remat", action="store_true", help="rematerialise encoder stages")
    parser.add_argument("--param_sharding", default="replicated",
                        choices=["replicated", "fsdp"])
    parser.add_argument("--memory_only", action="store_true",
                        help="compile only; report compile time, FLOPs and memory")
    parser.add_argument("--torch", action="store_true",
                        help="time the authors' PyTorch train step side by side, interleaved with ours "
                        "(on --torch_device at the first --torch_precision; float32 on the CPU by default)")
    parser.add_argument("--torch_only", action="store_true",
                        help="time only the authors' step (no JAX program), on --torch_device at each "
                        "--torch_precision: on a GPU, run it in its own process so that the two "
                        "frameworks' allocators do not share the card")
    parser.add_argument("--torch_device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--torch_precision", nargs="+", default=["float32"],
                        choices=["float32", "float16"],
                        help="float16: the authors' network under torch.autocast (loss in float32)")
    parser.add_argument("--authors_repo", default="/tmp/p3m_authors",
                        help="checkout of github.com/ViTAE-Transformer/P3M-Net (for --torch)")
    parser.add_argument("--profile", default="",
                        help="write a jax.profiler trace of one step here and print top ops")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    if args.torch_only:
        return _main_torch_only(args)
    from p3m_jax.train.mesh import initialize_distributed_if_needed
    initialize_distributed_if_needed()
    dev = jax.devices()[0]
    print(f"# {dev.platform} {dev.device_kind} x{jax.device_count()} "
          f"({jax.process_count()} process(es)), {args.size}x{args.size}, per-device batch "
          f"{args.batch}, remat={args.remat}, params {args.param_sharding}, "
          f"median of {args.repeats}", flush=True)
    cols = ("arch", "dtype", "compile", "step", "img/s", "img/s/dev", "TFLOP/step", "TFLOP/s",
            "MFU", "mem total", "mem temp", "torch step", "ours/torch")
    print(" | ".join(cols), flush=True)
    rows = []
    torch_cache = {}
    for arch in args.arch:
        for dtype_name in args.dtype:
            dtype = jnp.dtype(dtype_name)
            other = None
            if args.torch and not args.memory_only:
                if arch not in torch_cache:
                    torch_cache[arch] = make_torch_step(arch, args.size, args.batch,
                                                        args.authors_repo, args.torch_device,
                                                        args.torch_precision[0])
                other = torch_cache[arch]
            r = bench_jax(arch, dtype, args.size, args.batch, args.repeats, args.remat,
                          args.param_sharding, args.memory_only,
                          os.path.join(args.profile, f"{arch}_{dtype_name}")
                          if args.profile else None, other_step=other)
            if "other_step_s" in r:
                r["torch_step_s"] = r.pop("other_step_s")
                r["ratio_vs_torch"] = r["step_s"] / r["torch_step_s"]
            rows.append(r)
            mem = r["memory"]
            fmt = lambda v, f: (f % v) if isinstance(v, (int, float)) and v == v else "-"
            print(" | ".join([
                arch, dtype_name, f"{r['compile_s']:.1f}s", fmt(r.get("step_s"), "%.3fs"),
                fmt(r.get("images_per_s"), "%.2f"), fmt(r.get("images_per_s_per_device"), "%.2f"),
                fmt(r["flops"] / 1e12, "%.3f"), fmt(r.get("tflops"), "%.3f"),
                ("unknown" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%")
                if not args.memory_only else "-",
                _fmt_bytes(mem.get("total")), _fmt_bytes(mem.get("temp")),
                fmt(r.get("torch_step_s"), "%.3fs"), fmt(r.get("ratio_vs_torch"), "%.2f")]),
                flush=True)
            for op, sec in r.get("profile", []):
                print(f"#   {op:40s} {sec:8.3f}s")
            _print_time_by_part(r.get("profile_by_part"))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return rows


def _print_time_by_part(by_part, top_parts: int = 16):
    if not by_part or not by_part["parts"]:
        return
    total = sum(t for _, _, t in by_part["parts"])
    print(f"#   where the profiled step's op time went ({total:.3f}s summed over ops; ops that run "
          "side by side both count):")
    for direction, part, sec in by_part["parts"][:top_parts]:
        print(f"#     {direction:8s} {part:32s} {sec:7.3f}s {100 * sec / total:5.1f}%")
    print("#   largest HLO ops:")
    for op, sec, direction, part, primitive in by_part["ops"]:
        print(f"#     {op:32s} {sec:7.3f}s  {direction} {part} ({primitive})")
    print(flush=True)


def _main_torch_only(args):
    import torch
    name = torch.cuda.get_device_name() if args.torch_device == "cuda" else "cpu"
    print(f"# authors' PyTorch {torch.__version__} on {name}, {args.size}x{args.size}, batch "
          f"{args.batch}, median of {args.repeats}", flush=True)
    print("arch | precision | step | img/s | peak memory", flush=True)
    rows = []
    for arch in args.arch:
        for precision in args.torch_precision:
            r = bench_torch(arch, args.size, args.batch, args.repeats, args.authors_repo,
                            args.torch_device, precision)
            rows.append(r)
            if "error" in r:
                print(f"{arch} | {precision} | {r['error']}", flush=True)
            else:
                print(f"{arch} | {precision} | {r['step_s']:.4f}s | {r['images_per_s']:.2f} | "
                      f"{_fmt_bytes(r.get('peak_memory'))}", flush=True)
            if args.torch_device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
