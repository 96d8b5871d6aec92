"""Training-step benchmark: compile time, step time, throughput, FLOPs, MFU and memory.

    python benchmarks/bench_train_step.py --arch resnet34 swin_t vitae_s --size 512 --batch 8 \
        --dtype float32 bfloat16 [--remat none|encoder|decoder|full] [--param_sharding fsdp] \
        [--torch --authors_repo DIR] [--memory_only] [--profile DIR]
    python benchmarks/bench_train_step.py --torch_only --torch_device cuda --torch_precision float32 float16 \
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

import dataclasses
import gzip
import json
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

from p3m_jax.common import cli  # noqa: E402
from p3m_jax.train.memory_plan import StepMemory  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from authors_torch import bench_torch, host_batch, make_torch_step  # noqa: E402
from device_turns import end_device_turn, wait_for_device_turn  # noqa: E402
from profile_trace import time_by_network_part, top_ops_from_trace  # noqa: E402

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
    loops over kernel taps (see `p3m_jax.ops.conv_cpu`) whose bodies are counted once. The
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
    """The memory plan's figures of ``compiled`` (`StepMemory`) as a dict for the printed rows."""
    memory = StepMemory.of(compiled)
    return {} if memory is None else {**dataclasses.asdict(memory), "total": memory.total}


def bench_jax(
    arch: str,
    dtype,
    size: int,
    batch: int,
    repeats: int,
    remat: str,
    param_sharding: str,
    memory_only: bool,
    profile_dir: str | None,
    other_step=None,
) -> dict:
    """Compiles and times our train step. With ``other_step`` (a callable running one step
    of another implementation), it is timed interleaved with ours, so both see the same
    machine load; its median lands in ``other_step_s``."""
    from p3m_jax.configs import p3m10k
    from p3m_jax.models import build_model
    from p3m_jax.train import (
        OptimizerOptions,
        batch_sharding,
        create_train_state,
        make_mesh,
        make_optimizer,
        make_train_step,
        state_shardings,
    )

    mesh = make_mesh()
    n_dev = mesh.size
    model = build_model(arch, dtype=dtype, remat=remat)
    tx, lr = make_optimizer(OptimizerOptions.from_config(p3m10k.get_config().optimizer), 1000)
    make_state = lambda r: create_train_state(model, tx, r, 64)
    abstract = jax.eval_shape(make_state, jax.random.key(0))
    shardings = state_shardings(abstract, mesh, param_sharding)
    step = make_train_step(model, tx, mesh, shardings, lr)
    hb = host_batch(batch * n_dev, size)
    bsh = batch_sharding(mesh)
    abstract_state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh) for k, v in hb.items()}
    t0 = time.perf_counter()
    compiled = step.lower(abstract_state, abstract_batch).compile()
    compile_s = time.perf_counter() - t0
    flops = step_flops(step, abstract_state, abstract_batch, n_dev)
    row = {
        "arch": arch,
        "dtype": jnp.dtype(dtype).name,
        "remat": remat,
        "devices": n_dev,
        "device_kind": jax.devices()[0].device_kind,
        "global_batch": batch * n_dev,
        "compile_s": compile_s,
        "flops": flops,
        "memory": _memory(compiled),
    }
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
    row.update(
        step_s=step_s,
        loss=float(metrics["loss"]),
        images_per_s=batch * n_dev / step_s,
        images_per_s_per_device=batch / step_s,
        tflops=row["flops"] / step_s / 1e12,
    )
    peak = peak_flops(row["device_kind"], dtype)
    row["mfu"] = row["flops"] / step_s / peak if peak else None
    return row


# ------------------------------------------------------------------ CLI


def _fmt_bytes(n):
    return f"{n / 2**30:.2f}G" if n else "-"


def write_rows(output: str, rows) -> None:
    """The printed rows as ``<output>/bench_train_step.json`` when ``--output`` is given."""
    if output:
        pathlib.Path(output).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(output) / "bench_train_step.json").write_text(json.dumps(rows, indent=1, default=str))


def main(argv=None):
    parser = cli.ArgumentParser("python benchmarks/bench_train_step.py", __doc__)
    parser.add_argument("--arch", nargs="+", default=["resnet34", "swin_t", "vitae_s"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="per-device batch")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--remat", default="none", choices=["none", "encoder", "decoder", "full"], help="rematerialisation policy"
    )
    parser.add_argument("--param_sharding", default="replicated", choices=["replicated", "fsdp"])
    parser.add_argument(
        "--memory_only", action="store_true", help="compile only; report compile time, FLOPs and memory"
    )
    parser.add_argument(
        "--torch",
        action="store_true",
        help="time the authors' PyTorch train step side by side, interleaved with ours "
        "(on --torch_device at the first --torch_precision; float32 on the CPU by default)",
    )
    parser.add_argument(
        "--torch_only",
        action="store_true",
        help="time only the authors' step (no JAX program), on --torch_device at each "
        "--torch_precision: on a GPU, run it in its own process so that the two "
        "frameworks' allocators do not share the card",
    )
    parser.add_argument("--torch_device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--torch_precision",
        nargs="+",
        default=["float32"],
        choices=["float32", "float16"],
        help="float16: the authors' network under torch.autocast (loss in float32)",
    )
    parser.add_argument(
        "--authors_repo",
        default=None,
        help="checkout of github.com/ViTAE-Transformer/P3M-Net (for --torch and --torch_only)",
    )
    parser.add_argument("--profile", default="", help="write a jax.profiler trace of one step here and print top ops")
    parser.add_argument("--output", default="", help="also write the rows to <output>/bench_train_step.json")
    args = parser.parse_args(argv)
    if (args.torch or args.torch_only) and not args.authors_repo:
        parser.error("--torch and --torch_only need --authors_repo DIR (a checkout of the authors' repository)")

    if args.torch_only:
        return _main_torch_only(args)
    from p3m_jax.train.mesh import initialize_distributed_if_needed

    initialize_distributed_if_needed()
    dev = jax.devices()[0]
    print(
        f"# {dev.platform} {dev.device_kind} x{jax.device_count()} "
        f"({jax.process_count()} process(es)), {args.size}x{args.size}, per-device batch "
        f"{args.batch}, remat={args.remat}, params {args.param_sharding}, "
        f"median of {args.repeats}",
        flush=True,
    )
    cols = (
        "arch",
        "dtype",
        "compile",
        "step",
        "img/s",
        "img/s/dev",
        "TFLOP/step",
        "TFLOP/s",
        "MFU",
        "mem total",
        "mem temp",
        "torch step",
        "ours/torch",
    )
    print(" | ".join(cols), flush=True)
    rows = []
    torch_cache = {}
    for arch in args.arch:
        for dtype_name in args.dtype:
            dtype = jnp.dtype(dtype_name)
            other = None
            if args.torch and not args.memory_only:
                if arch not in torch_cache:
                    torch_cache[arch] = make_torch_step(
                        arch, args.size, args.batch, args.authors_repo, args.torch_device, args.torch_precision[0]
                    )
                other = torch_cache[arch]
            r = bench_jax(
                arch,
                dtype,
                args.size,
                args.batch,
                args.repeats,
                args.remat,
                args.param_sharding,
                args.memory_only,
                os.path.join(args.profile, f"{arch}_{dtype_name}") if args.profile else None,
                other_step=other,
            )
            if "other_step_s" in r:
                r["torch_step_s"] = r.pop("other_step_s")
                r["ratio_vs_torch"] = r["step_s"] / r["torch_step_s"]
            rows.append(r)
            mem = r["memory"]
            fmt = lambda v, f: (f % v) if isinstance(v, (int, float)) and v == v else "-"
            print(
                " | ".join(
                    [
                        arch,
                        dtype_name,
                        f"{r['compile_s']:.1f}s",
                        fmt(r.get("step_s"), "%.3fs"),
                        fmt(r.get("images_per_s"), "%.2f"),
                        fmt(r.get("images_per_s_per_device"), "%.2f"),
                        fmt(r["flops"] / 1e12, "%.3f"),
                        fmt(r.get("tflops"), "%.3f"),
                        ("unknown" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%")
                        if not args.memory_only
                        else "-",
                        _fmt_bytes(mem.get("total")),
                        _fmt_bytes(mem.get("temp")),
                        fmt(r.get("torch_step_s"), "%.3fs"),
                        fmt(r.get("ratio_vs_torch"), "%.2f"),
                    ]
                ),
                flush=True,
            )
            for op, sec in r.get("profile", []):
                print(f"#   {op:40s} {sec:8.3f}s")
            _print_time_by_part(r.get("profile_by_part"))
    write_rows(args.output, rows)
    return rows


def _print_time_by_part(by_part, top_parts: int = 16):
    if not by_part or not by_part["parts"]:
        return
    total = sum(t for _, _, t in by_part["parts"])
    print(
        f"#   where the profiled step's op time went ({total:.3f}s summed over ops; ops that run "
        "side by side both count):"
    )
    for direction, part, sec in by_part["parts"][:top_parts]:
        print(f"#     {direction:8s} {part:32s} {sec:7.3f}s {100 * sec / total:5.1f}%")
    print("#   largest HLO ops:")
    for op, sec, direction, part, primitive in by_part["ops"]:
        print(f"#     {op:32s} {sec:7.3f}s  {direction} {part} ({primitive})")
    print(flush=True)


def _main_torch_only(args):
    import torch

    name = torch.cuda.get_device_name() if args.torch_device == "cuda" else "cpu"
    print(
        f"# authors' PyTorch {torch.__version__} on {name}, {args.size}x{args.size}, batch "
        f"{args.batch}, median of {args.repeats}",
        flush=True,
    )
    print("arch | precision | step | img/s | peak memory", flush=True)
    rows = []
    for arch in args.arch:
        for precision in args.torch_precision:
            r = bench_torch(arch, args.size, args.batch, args.repeats, args.authors_repo, args.torch_device, precision)
            rows.append(r)
            if "error" in r:
                print(f"{arch} | {precision} | {r['error']}", flush=True)
            else:
                print(
                    f"{arch} | {precision} | {r['step_s']:.4f}s | {r['images_per_s']:.2f} | "
                    f"{_fmt_bytes(r.get('peak_memory'))}",
                    flush=True,
                )
            if args.torch_device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    write_rows(args.output, rows)
    return rows


if __name__ == "__main__":
    main()
