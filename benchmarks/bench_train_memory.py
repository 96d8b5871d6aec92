"""Compiled memory and FLOPs of the train step per rematerialisation policy and batch, without running it.

    python benchmarks/bench_train_memory.py --arch resnet34 swin_t vitae_s --size 512 --batch 8 32 \
        --remat none decoder encoder full [--grad_accum 1 4] [--dtype bfloat16]

One row per (arch, per-device batch, remat policy, accumulation): the real train step (P3M loss, Adam,
float32 parameters) compiled for one device from abstract inputs (nothing is allocated), in the portable
forms of the ops (`ops.platform.portable_program`: XLA's convolution and LayerNorm as a GPU or TPU runs
them, not the CPU's rewrites; ViTAE's global attention in its query chunks). The
memory is what the memory plan of ``python -m p3m_jax.main`` reads (`p3m_jax.train.memory_plan.StepMemory`):
arguments + outputs + temporaries - donated buffers. "kept for backward" is what the forward pass keeps
for the backward pass before XLA schedules the program (`backward_residual_bytes`), which is what the
policies lower. The FLOPs are XLA's cost analysis of the compiled step, recomputation included. A CPU compile gives the numbers without a GPU; a GPU compile's differ a little
(other fusions and convolution algorithms).
"""

from __future__ import annotations

import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from authors_torch import host_batch  # noqa: E402
from p3m_jax.common import cli  # noqa: E402
from p3m_jax.configs import p3m10k  # noqa: E402
from p3m_jax.models import REMAT_POLICIES, build_model  # noqa: E402
from p3m_jax.ops.platform import portable_program  # noqa: E402
from p3m_jax.train import OptimizerOptions, batch_sharding, create_train_state, make_mesh, make_optimizer  # noqa: E402
from p3m_jax.train import make_train_step, state_shardings  # noqa: E402
from p3m_jax.train.memory_plan import GIB, StepMemory, backward_residual_bytes  # noqa: E402


def compile_step(arch: str, dtype, size: int, batch: int, remat: str, grad_accum: int, compile: bool = True):
    """The train step compiled from abstract inputs; returns (compiled, seconds, bytes the forward pass keeps
    for the backward pass: `backward_residual_bytes`, without accumulation)."""
    mesh = make_mesh(jax.devices()[:1])
    model = build_model(arch, dtype=dtype, remat=remat)
    tx, lr = make_optimizer(OptimizerOptions.from_config(p3m10k.get_config().optimizer), 1000)
    abstract = jax.eval_shape(lambda r: create_train_state(model, tx, r, 64), jax.random.key(0))
    shardings = state_shardings(abstract, mesh)
    step = make_train_step(model, tx, mesh, shardings, lr, grad_accum_steps=grad_accum)
    abstract_state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    batch_sh = batch_sharding(mesh)
    abstract_batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh) for k, v in host_batch(batch, size).items()
    }
    start = time.perf_counter()
    with portable_program():
        compiled = step.lower(abstract_state, abstract_batch).compile() if compile else None
        residuals = backward_residual_bytes(model, abstract_state, abstract_batch) if grad_accum == 1 else None
    return compiled, time.perf_counter() - start, residuals


def main(argv=None) -> int:
    parser = cli.ArgumentParser("python benchmarks/bench_train_memory.py", __doc__)
    parser.add_argument("--arch", nargs="+", default=["resnet34", "swin_t", "vitae_s"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", nargs="+", type=int, default=[8, 32], help="per-device batch sizes")
    parser.add_argument("--remat", nargs="+", default=list(REMAT_POLICIES), choices=list(REMAT_POLICIES))
    parser.add_argument("--grad_accum", nargs="+", type=int, default=[1], help="micro-batches per step")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--trace_only", action="store_true", help="only what is kept for backward (no compile)")
    args = parser.parse_args(argv)
    dev = jax.devices()[0]
    print(
        f"# {dev.platform} {dev.device_kind}, jax {jax.__version__}, {args.size}x{args.size}, {args.dtype}",
        flush=True,
    )
    print(
        "arch | batch/device | remat | grad_accum | memory | temporaries | kept for backward | GFLOP/step | compile",
        flush=True,
    )
    for arch in args.arch:
        for batch in args.batch:
            for grad_accum in args.grad_accum:
                if batch % grad_accum:
                    continue
                for remat in args.remat:
                    compiled, seconds, residuals = compile_step(
                        arch, jnp.dtype(args.dtype), args.size, batch, remat, grad_accum, not args.trace_only
                    )
                    memory = StepMemory.of(compiled) if compiled else None
                    cost = compiled.cost_analysis() if compiled else {}
                    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
                    # The cost analysis counts the accumulation loop's body once: no FLOPs for those rows.
                    flops = float((cost or {}).get("flops", float("nan"))) if grad_accum == 1 else float("nan")
                    compiled_gib = lambda n: f"{n / GIB:.2f} GiB" if memory else "-"
                    print(
                        f"{arch} | {batch} | {remat} | {grad_accum} | {compiled_gib(memory and memory.total)} | "
                        f"{compiled_gib(memory and memory.temp)} | "
                        + (f"{residuals / GIB:.2f} GiB" if residuals is not None else "-")
                        + f" | {f'{flops / 1e9:.0f}' if flops == flops else '-'} | {seconds:.0f} s",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
