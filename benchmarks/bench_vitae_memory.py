"""Peak host memory of one P3M-Net(ViTAE-S) forward pass on CPU at a large test size.

    python benchmarks/bench_vitae_memory.py [--height 1088 --width 1600 --arch vitae_s]

Prints the process's peak resident set size (``ru_maxrss``) after initialization and after the
jitted forward pass, and the forward time (second call, compiled). The global attention of the
ViTAE stages 2-4 runs through `p3m_jax.models.attention.global_attention` (query chunks), so
the 27,200 x 27,200 logits of stage 2 at 1088x1600 never exist at once.
"""

from __future__ import annotations

import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from p3m_jax.common import cli
from p3m_jax.models import build_model, init_variables


def peak_rss_gib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None) -> int:
    parser = cli.ArgumentParser("python benchmarks/bench_vitae_memory.py", __doc__)
    parser.add_argument("--arch", default="vitae_s")
    parser.add_argument("--height", type=int, default=1088)
    parser.add_argument("--width", type=int, default=1600)
    args = parser.parse_args(argv)
    model = build_model(args.arch)
    variables = jax.jit(lambda r: init_variables(model, r))(jax.random.key(0))
    jax.block_until_ready(variables)
    print(f"{args.arch}: peak RSS after init: {peak_rss_gib():.2f} GiB", flush=True)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, args.height, args.width, 3)), jnp.float32)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    start = time.perf_counter()
    out = jax.block_until_ready(forward(variables, x))
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(forward(variables, x))
    second = time.perf_counter() - start
    finite = all(bool(jnp.isfinite(v).all()) for v in out.values())
    print(
        f"{args.arch} {args.height}x{args.width} forward: first call (with compile) "
        f"{first:.1f} s, second call {second:.1f} s, outputs finite: {finite}"
    )
    print(f"peak RSS: {peak_rss_gib():.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
