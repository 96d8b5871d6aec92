"""The Cloud TPU planning table of docs/training.md: for each variant (with and without P3M-CP) and slice,
the largest per-chip batch that fits at a crop size with a remat policy, and the compiled step's memory,
roofline step time and images/s per chip. Every figure comes from an ahead-of-time compile for that slice
with libtpu (pip install "p3m-jax[tpu]"): a model of the step, not a measurement.

    python benchmarks/tpu_plan_table.py --arch resnet34 swin_t vitae_s --target v5litepod-8 \\
        --batch_per_chip 8 --search --output tpu_plans.jsonl

Each compile of a real network takes minutes on a 2-core CPU: `--search` doubles the per-chip batch from
``--batch_per_chip`` until a compile runs out of HBM (then bisects), so it costs several compiles per row.
Rows are appended to ``--output`` as they finish (JSON lines), and a row already there is not compiled again;
``--markdown --output FILE`` prints them as the table of docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

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


def _line(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Intercept and slope (GiB, GiB per image) of the least-squares line through (batch, memory) points."""
    if len({b for b, _ in points}) < 2:
        return None
    slope, intercept = np.polyfit([b for b, _ in points], [m for _, m in points], 1)
    return float(intercept), float(slope)


def largest_batch(compile_at, start: int, hbm_gib: float, prior_slope: float | None = None):
    """The row of the largest per-chip batch that fits, and the model's bound on it.

    A compile's memory grows about linearly with the per-chip batch (weights and optimizer state fixed,
    activations per image), and a compile that runs out of HBM still says how much it needed. So: compile
    at ``start``, predict the largest batch from a line through the compiles so far (from ``prior_slope``,
    another slice's, or a compile at twice ``start`` until there are two), compile that batch, and repeat
    until the prediction lands on a batch already known to fit. Each step costs one compile (minutes).
    Near the limit XLA:TPU rematerialises on its own to fit (more FLOPs, the same memory), so the batch
    found is the largest the line allows, not the largest the compiler could squeeze in.
    Returns (best fitting row or None, every row, the line's largest batch)."""
    rows: dict[int, dict] = {}

    def at(per_chip):
        if per_chip not in rows:
            rows[per_chip] = compile_at(per_chip)
        return rows[per_chip]

    at(start)
    predicted = None
    for _ in range(8):
        fitting = [b for b, r in rows.items() if r["fits"]]
        failing = [b for b, r in rows.items() if not r["fits"]]
        low, high = max(fitting, default=0), min(failing, default=None)
        if high is not None and high == low + 1:
            break
        points = [(b, r["memory_gib"]) for b, r in rows.items()]
        line = _line(points)
        if line is None and prior_slope is not None:
            ((b0, m0),) = points
            line = (m0 - prior_slope * b0, prior_slope)
        if line is None:
            at(start * 2 if rows[start]["fits"] else max(1, start // 2))
            continue
        intercept, slope = line
        predicted = int((hbm_gib - intercept) // slope) if slope > 0 else start * 2
        if fitting and predicted <= low:  # the line puts the limit at a batch that fits already
            break
        candidate = max(low + 1, min(predicted, (high - 1) if high else predicted))
        if candidate in rows or (high is not None and candidate >= high) or candidate < 1:
            break
        at(candidate)
    fitting = [b for b, r in rows.items() if r["fits"]]
    best = rows[max(fitting)] if fitting else None
    return best, list(rows.values()), predicted


def markdown(rows: list[dict]) -> str:
    """The rows as the table of docs/training.md, one line per compile."""
    lines = [
        "| variant | P3M-CP | slice | remat | per chip | fits | memory per chip | TFLOP | GB accessed | roofline step | images/s per chip | compile here |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = {"resnet34": "ResNet-34", "swin_t": "Swin-T", "vitae_s": "ViTAE-S"}
    order = lambda r: (r["target"], r["arch"], r["copy_paste"], r["remat"], r["per_chip"])  # noqa: E731
    for row in sorted(rows, key=order):
        chip = tpu_plan.parse_target(row["target"]).chip
        hosts = f", {row['hosts']} hosts" if row.get("hosts", 1) > 1 else ""
        memory = f"{row['memory_gib']:.2f} GiB" if row["fits"] else f"needs {row['memory_gib']:.2f} GiB"
        cells = [
            names.get(row["arch"], row["arch"]),
            "on" if row["copy_paste"] else "off",
            f"{row['target']}{hosts}",
            row["remat"] + (", fsdp" if row["param_sharding"] == "fsdp" else ""),
            str(row["per_chip"]),
            "yes" if row["fits"] else f"no (HBM {chip.hbm_bytes / tpu_plan.GIB:.0f} GiB)",
            memory,
        ]
        if row["fits"]:
            cells += [f"{row['tflop']:.3f}", f"{row['gb_accessed']:.1f}", f"{row['roofline_ms']:.1f} ms"]
            cells += [f"{row['images_per_s_per_chip']:.1f}"]
        else:
            cells += ["", "", "", ""]
        cells.append(f"{row['compile_s']:.0f} s")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _other_slices_line(done, target_name, arch, copy_paste, remat, args):
    """The (intercept, slope) line of this setting's compiles on other slices, or None."""
    points = [
        (row["per_chip"], row["memory_gib"])
        for row in done
        if row["target"] != target_name
        and (row["arch"], row["copy_paste"], row["remat"]) == (arch, copy_paste, remat)
        and (row["size"], row["param_sharding"]) == (args.size, args.param_sharding)
    ]
    return _line(points)


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
    parser.add_argument("--markdown", action="store_true", help="print the rows of --output as a table and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        with open(args.output, encoding="utf-8") as f:
            print(markdown([json.loads(line) for line in f if line.strip()]))
        return 0
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

                    if not args.search:
                        compile_at(args.batch_per_chip)
                        continue
                    start, slope = args.batch_per_chip, None
                    prior = _other_slices_line(done, target.name, arch, copy_paste, remat, args)
                    if prior is not None:  # another slice's line: start at its prediction for this chip's HBM
                        start = max(1, int((target.chip.hbm_bytes / tpu_plan.GIB - prior[0]) // prior[1]))
                        slope = prior[1]
                    best, _, predicted = largest_batch(compile_at, start, target.chip.hbm_bytes / tpu_plan.GIB, slope)
                    print(f"largest: {json.dumps(best)} (the line's largest: {predicted})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
