"""The Cloud TPU planning table of docs/training.md: for each variant (with and without P3M-CP) and slice,
the largest per-chip batch that fits at a crop size with a remat policy, and the compiled step's memory,
roofline step time and images/s per chip. Every figure comes from an ahead-of-time compile for that slice
with libtpu (pip install "p3m-jax[tpu]"): a model of the step, not a measurement.

    python benchmarks/tpu_plan_table.py --arch resnet34 swin_t vitae_s --target v5litepod-8 \\
        --batch_per_chip 8 --search --output tpu_plans.jsonl

Each compile of a real network takes minutes on a 2-core CPU: `--search` doubles the per-chip batch from
``--batch_per_chip`` until a compile runs out of HBM (then bisects), so it costs several compiles per row.
Rows are appended to ``--output`` as they finish (JSON lines), and a row already there is not compiled again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling for a TPU needs no local accelerator
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from p3m_jax.configs import p3m10k  # noqa: E402
from p3m_jax.train import memory_plan, tpu_plan  # noqa: E402
from p3m_jax.train import mesh as mesh_lib  # noqa: E402
from p3m_jax.train.program import TrainProgram  # noqa: E402


def config_for(arch: str, batch: int, size: int, remat: str, copy_paste: bool, param_sharding: str):
    config = p3m10k.get_config(arch)
    with config.unlocked():
        config.batch_size = batch
        config.data.image_size = size
        config.data.crop_sizes = (size,)
        config.dtype = "bfloat16"
        config.remat = remat
        config.param_sharding = param_sharding
        config.copy_paste.icp.enabled = copy_paste
        config.copy_paste.fcp.enabled = copy_paste
    return config


def compile_row(arch, target, per_chip, size, remat, copy_paste, param_sharding) -> dict:
    """One compile: the step's memory, FLOPs, bytes and roofline at ``per_chip`` images per chip."""
    devices = target.devices()
    config = config_for(arch, per_chip * len(devices), size, remat, copy_paste, param_sharding)
    program = TrainProgram.build(config, mesh_lib.make_mesh(devices))
    start = time.perf_counter()
    compiled = tpu_plan._compile_or_out_of_memory(  # pylint: disable=protected-access
        lambda: program.compile(memory_plan.current_setting(config)), target.chip.hbm_bytes
    )
    cost = tpu_plan.ProgramCost.of(compiled, time.perf_counter() - start)
    row = {
        "arch": arch,
        "copy_paste": copy_paste,
        "target": target.name,
        "chips": len(devices),
        "hosts": len({d.process_index for d in devices}),
        "size": size,
        "remat": remat,
        "param_sharding": param_sharding,
        "per_chip": per_chip,
        "fits": cost.fits and cost.memory.total <= target.chip.hbm_bytes,
        "memory_gib": round(cost.memory.total / tpu_plan.GIB, 2),
        "compile_s": round(cost.compile_s, 1),
    }
    if cost.fits:
        step = cost.roofline_s(target.chip)
        row.update(
            tflop=round(cost.flops / 1e12, 3),
            gb_accessed=round(cost.bytes_accessed / 1e9, 1),
            roofline_ms=round(step * 1e3, 1),
            images_per_s_per_chip=round(per_chip / step, 1),
        )
    return row


def largest_batch(compile_at, start: int) -> tuple[dict | None, list[dict]]:
    """The row of the largest per-chip batch that fits (doubling from ``start``, then bisecting), and all rows."""
    rows, best, low, high, per_chip = [], None, 0, None, start
    while per_chip >= 1 and (high is None or per_chip < high) and per_chip > low:
        row = compile_at(per_chip)
        rows.append(row)
        if row["fits"]:
            best, low = row, per_chip
            per_chip = per_chip * 2 if high is None else (low + high) // 2
        else:
            high = per_chip
            per_chip = (low + high) // 2 if low else per_chip // 2
    return best, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["resnet34", "swin_t", "vitae_s"])
    parser.add_argument("--target", nargs="+", default=["v5litepod-8"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch_per_chip", type=int, default=8)
    parser.add_argument("--remat", nargs="+", default=["none"])
    parser.add_argument("--copy_paste", choices=("off", "on", "both"), default="off")
    parser.add_argument("--param_sharding", default="replicated", choices=("replicated", "fsdp"))
    parser.add_argument("--search", action="store_true", help="find the largest per-chip batch that fits")
    parser.add_argument("--output", default=None, help="append rows here (JSON lines); rows already there are kept")
    args = parser.parse_args(argv)
    done = []
    if args.output and os.path.exists(args.output):
        with open(args.output, encoding="utf-8") as f:
            done = [json.loads(line) for line in f if line.strip()]
    cps = {"off": [False], "on": [True], "both": [False, True]}[args.copy_paste]
    for target_name in args.target:
        target = tpu_plan.parse_target(target_name)
        for arch in args.arch:
            for copy_paste in cps:
                for remat in args.remat:

                    def compile_at(per_chip):
                        key = dict(arch=arch, target=target.name, size=args.size, remat=remat, copy_paste=copy_paste)
                        key.update(per_chip=per_chip, param_sharding=args.param_sharding)
                        for row in done:
                            if all(row.get(k) == v for k, v in key.items()):
                                return row
                        row = compile_row(arch, target, per_chip, args.size, remat, copy_paste, args.param_sharding)
                        print(json.dumps(row), flush=True)
                        if args.output:
                            with open(args.output, "a", encoding="utf-8") as f:
                                f.write(json.dumps(row) + "\n")
                        done.append(row)
                        return row

                    if args.search:
                        best, _ = largest_batch(compile_at, args.batch_per_chip)
                        print(f"largest: {json.dumps(best)}", flush=True)
                    else:
                        compile_at(args.batch_per_chip)
    return 0


if __name__ == "__main__":
    sys.exit(main())
