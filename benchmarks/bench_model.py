"""Speed of P3M-Net inference and of a training step, with XLA's FLOP count.

    python benchmarks/bench_model.py [--arch resnet34 swin_t vitae_s] [--size 512] [--repeats 3]

Prints one row per architecture: compile time, median wall time of an eval-mode forward pass
(batch 1) and of a training step (forward + backward + Adam update, batch 1, train-mode
BatchNorm), and the forward FLOPs reported by ``jax.jit(...).lower(...).compile()
.cost_analysis()``. The training step's loss is a stand-in (mean of the outputs) with the same
backward cost as the real losses up to their elementwise terms.
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

from p3m_jax.common import cli
from p3m_jax.models import build_model, init_variables
from p3m_jax.weights.initialize import init_key


def timed(fn, *args, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flops_of(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


def bench(arch: str, size: int, repeats: int, dtype) -> dict:
    model = build_model(arch, dtype=dtype)
    variables = jax.jit(lambda r: init_variables(model, r))(init_key(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, size, size, 3)), jnp.float32)

    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    t0 = time.perf_counter()
    compiled_fwd = forward.lower(variables, x).compile()
    fwd_compile = time.perf_counter() - t0
    fwd_time = timed(compiled_fwd, variables, x, repeats=repeats)

    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    tx = optax.adam(1e-5)
    opt_state = tx.init(params)

    def train_step(params, rest, opt_state, x):
        def loss_fn(p):
            # The dropout key drives Swin-T's stochastic depth; the others ignore it.
            out, updates = model.apply(
                {"params": p, **rest}, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
            )
            return sum(jnp.mean(v) for v in out.values()), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, upd), {**rest, **updates}, opt_state, loss

    step = jax.jit(train_step, donate_argnums=(0, 2))
    t0 = time.perf_counter()
    compiled_step = step.lower(params, rest, opt_state, x).compile()
    step_compile = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        params, rest, opt_state, loss = compiled_step(params, rest, opt_state, x)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    flops = flops_of(compiled_fwd)
    return {
        "arch": arch,
        "fwd_compile_s": fwd_compile,
        "fwd_s": fwd_time,
        "step_compile_s": step_compile,
        "step_s": statistics.median(times),
        "fwd_gflop": flops / 1e9,
        "fwd_gflops_per_s": flops / 1e9 / fwd_time,
    }


def main():
    parser = cli.ArgumentParser("python benchmarks/bench_model.py", __doc__)
    parser.add_argument("--arch", nargs="+", default=["resnet34", "swin_t", "vitae_s"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bfloat16", action="store_true", help="bfloat16 compute")
    args = parser.parse_args()
    dtype = jnp.bfloat16 if args.bfloat16 else jnp.float32
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"{args.size}x{args.size}, batch 1, {jnp.dtype(dtype).name}, median of {args.repeats}"
    )
    header = (
        f"{'arch':9s} {'fwd compile':>11s} {'forward':>9s} {'step compile':>12s} "
        f"{'train step':>10s} {'fwd GFLOP':>9s} {'GFLOP/s':>8s}"
    )
    print(header)
    for arch in args.arch:
        r = bench(arch, args.size, args.repeats, dtype)
        print(
            f"{r['arch']:9s} {r['fwd_compile_s']:10.1f}s {r['fwd_s']:8.2f}s "
            f"{r['step_compile_s']:11.1f}s {r['step_s']:9.2f}s {r['fwd_gflop']:9.1f} "
            f"{r['fwd_gflops_per_s']:8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
