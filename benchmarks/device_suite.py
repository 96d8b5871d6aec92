"""GPU measurements for one short device lease: train steps, inference and evaluation, ours and the authors'.

    python benchmarks/device_suite.py --output DIR [--budget 540] [--batch 32] [--arch resnet34 swin_t vitae_s] \
        [--jobs train torch predict evaluate fp32 bigger] [--compile_limit 330] [--torch_arch ...] \
        [--focus_arch resnet34] [--authors_repo DIR] [--image PHOTO]

Made for a GPU lent for a few minutes, within `--budget` seconds. Every job's output goes to DIR/suite.log and the
parsed rows to DIR/results.json, so a call cut short still leaves what finished. The last thing printed is one
table of the train steps.

Compile side by side, time one at a time. XLA:GPU spends minutes compiling and autotuning each train step, mostly
on the host's cores, while the card idles: on an H200 (jax 0.11.2) ResNet-34's bfloat16 step at batch 32 took 120 s
alone, and Swin-T's more than 190 s. So the train, torch and evaluate jobs run as separate processes (`TurnGroup`),
up to `--parallel_compiles` of them compiling at once, in the order below; each compiles, says so, and waits. When
all have compiled, or after `--compile_limit` seconds (those still compiling are stopped), each job in turn gets
the device alone for its timed part, in the same order. The lower-priority jobs compile at a lower host priority
(nice 10). Eight compilations at once were too many for the H200 machine's 16 cores (none of Swin-T's or
ViTAE-S's finished within 274 s); two at once, with the autotuning results of that run carried, took 93 s and
107 s.

Jobs (`--jobs` picks some; `--arch` the variants and their order):
  env       GPU name and memory; jax, flax, optax and torch versions
  train     `bench_train_step.py` per variant: 512x512, per-device batch --batch, bfloat16, and the time per op of
            one more step under the profiler (the --focus_arch one's trace and compiled HLO are copied to DIR)
  torch     the authors' step alone (`bench_train_step.py --torch_only`), same size and batch, float32 and
            autocast float16, after each variant's own (--torch_arch: only some variants)
  evaluate  `benchmarks/bench_eval_throughput.py`: images/s on 512x512 synthetic portraits, float32, bfloat16
  fp32      `bench_train_step.py`, float32, at --batch
  bigger    --focus_arch in bfloat16 at 4x --batch
  predict   `benchmarks/bench_predict.py`, HYBRID at 1080x1620, after the others and alone (its first call is a
            cold start): bfloat16 with the authors' (float32) beside it, then float32
Our processes get XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 and no preallocation, as they share the card while
compiling. The authors' train steps run in processes of their own, so the two frameworks never share its memory
while timing.

Autotuning results. Our processes keep XLA:GPU's per-fusion autotuning results in --autotune_cache, and the
suite packs them into DIR/xla_autotune.tgz after the compile phase and at the end. Copy that file to
.devrun/xla_autotune.tgz and carry .devrun to the next lease: its compilations then skip the autotuning that is
already done (the results are keyed per fusion and GPU, so they stay valid across most code changes). Compile
times from such a run are not cold.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

from device_scheduler import Suite, TurnGroup
from device_suite_support import (
    autotune_flag,
    pack_autotune_cache,
    print_train_table,
    use_autotune_cache,
    with_xla_flags,
    xla_flags_accepted,
)  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
ARCHS = ("resnet34", "swin_t", "vitae_s")
JOBS = ("train", "torch", "predict", "evaluate", "fp32", "bigger")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="folder for results.json and the logs")
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole suite")
    parser.add_argument("--batch", type=int, default=32, help="per-device train batch")
    parser.add_argument("--size", type=int, default=512, help="train step image size")
    parser.add_argument("--predict_size", default="1080x1620", help="HxW of the photo for predict")
    parser.add_argument("--eval_images", type=int, default=16, help="synthetic portraits to evaluate")
    parser.add_argument("--eval_size", type=int, default=512, help="their height and width")
    parser.add_argument("--torch_device", default="cuda", help="cpu for a dry run of this script on a CPU")
    parser.add_argument("--authors_repo", default=str(REPO / ".devrun/authors"))
    parser.add_argument("--image", default=str(REPO / ".devrun/photo.jpg"))
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS, help="variants, in this order")
    parser.add_argument(
        "--jobs", nargs="+", default=list(JOBS), choices=JOBS, help="which jobs (always in the order of the list above)"
    )
    parser.add_argument(
        "--autotune_cache",
        default=str(REPO / ".devrun" / "xla_autotune"),
        help="XLA:GPU's per-fusion autotuning results go here, packed into "
        "OUT/xla_autotune.tgz after every job; a .devrun/xla_autotune.tgz carried from an "
        "earlier lease is unpacked here first ('' for none)",
    )
    parser.add_argument(
        "--xla_flags",
        default="",
        help="more XLA_FLAGS for our processes, for an A/B against a plain run, e.g. "
        "--xla_flags=--xla_gpu_enable_triton_gemm=false (the flags are tried first; compare "
        "compile times with --autotune_cache '' on both sides)",
    )
    parser.add_argument(
        "--compile_limit",
        type=float,
        default=330,
        help="seconds for the train, torch and evaluate jobs to compile side by side before "
        "their turns on the device begin (those still compiling are stopped)",
    )
    parser.add_argument(
        "--parallel_compiles", type=int, default=3, help="at most this many of our benchmark processes compile at once"
    )
    parser.add_argument(
        "--torch_arch", nargs="+", choices=ARCHS, help="the variants whose authors' steps run (default: --arch)"
    )
    parser.add_argument(
        "--focus_arch",
        default="resnet34",
        choices=ARCHS,
        help="the variant whose train step also runs at 4x --batch (job 'bigger') and whose "
        "bfloat16 profile trace and compiled HLO are copied to OUT",
    )
    args = parser.parse_args()
    out = pathlib.Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path("/tmp/device_suite")
    # A warm machine keeps /tmp between calls: an earlier call's profiles must not be copied to OUT as this one's.
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    suite = Suite(out, args.budget)
    py = sys.executable
    ours_env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.92"}
    autotune = ""
    if use_autotune_cache(args.autotune_cache, py):
        autotune = autotune_flag(args.autotune_cache)
        ours_env["XLA_FLAGS"] = with_xla_flags(autotune)
        suite.after_each_job = lambda: pack_autotune_cache(args.autotune_cache, out / "xla_autotune.tgz")
    if args.xla_flags:
        flags = with_xla_flags(autotune, args.xla_flags)
        if not xla_flags_accepted(flags, py):
            print(f"this XLA refuses XLA_FLAGS={flags!r}: stopping", flush=True)
            return 1
        ours_env["XLA_FLAGS"] = flags
        print(f"# our processes run with XLA_FLAGS={flags}", flush=True)
    bench = [py, str(REPO / "benchmarks" / "bench_train_step.py"), "--size", str(args.size)]
    height, width = args.predict_size.split("x")
    jobs = set(args.jobs)

    suite.run(
        "env",
        [
            "bash",
            "-c",
            "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm "
            "--format=csv; " + py + ' -c \'import jax, flax, optax, torch; print("jax", jax.__version__, '
            '"flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__, '
            "jax.devices())'",
        ],
        60,
        min_left=5,
    )

    # Train, torch and evaluate jobs: compiled side by side, timed one at a time (TurnGroup).
    group = TurnGroup(suite, scratch / "turns")
    group_env = {**ours_env, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # the processes share the card

    def train(arch, dtype, batch, profile=False, niceness=0):
        folder = scratch / f"train_{arch}_{dtype}_{batch}"
        extra = ["--profile", str(scratch / "profile")] if profile else []
        group.add(
            f"train {arch} {dtype} b{batch}",
            bench
            + ["--arch", arch, "--batch", str(batch), "--dtype", dtype, "--repeats", "10", "--output", str(folder)]
            + extra,
            group_env,
            folder / "bench_train_step.json",
            niceness=niceness,
            turn_limit=90,
        )

    for arch in args.arch:
        if "train" in jobs:
            train(arch, "bfloat16", args.batch, profile=True)
        if "torch" in jobs and arch in (args.torch_arch or args.arch):
            folder = scratch / f"torch_{arch}_{args.batch}"
            group.add(
                f"torch {arch} b{args.batch}",
                bench
                + [
                    "--torch_only",
                    "--torch_device",
                    args.torch_device,
                    "--torch_precision",
                    "float32",
                    "float16",
                    "--arch",
                    arch,
                    "--batch",
                    str(args.batch),
                    "--repeats",
                    "10",
                    "--authors_repo",
                    args.authors_repo,
                    "--output",
                    str(folder),
                ],
                {},
                folder / "bench_train_step.json",
                compiles=False,
                turn_limit=150,
            )
    if "evaluate" in jobs:
        folder = scratch / "evaluate"
        group.add(
            "evaluate",
            [
                py,
                "benchmarks/bench_eval_throughput.py",
                "--arch",
                *args.arch,
                "--images",
                str(args.eval_images),
                "--height",
                str(args.eval_size),
                "--width",
                str(args.eval_size),
                "--output",
                str(folder),
            ],
            group_env,
            folder / "bench_eval_throughput.json",
            niceness=10,
            turn_limit=120,
        )
    if "fp32" in jobs:
        for arch in args.arch:
            train(arch, "float32", args.batch, niceness=10)
    if "bigger" in jobs:
        train(args.focus_arch, "bfloat16", 4 * args.batch, niceness=10)
    if group.jobs:
        group.run(args.compile_limit, args.parallel_compiles)
        profile = scratch / "profile" / f"{args.focus_arch}_bfloat16"
        for trace in sorted(profile.glob("**/*.trace.json.gz"))[-1:]:
            shutil.copy(trace, out / f"trace_{args.focus_arch}_bfloat16.json.gz")
        if (profile / "compiled_hlo.txt.gz").exists():
            shutil.copy(profile / "compiled_hlo.txt.gz", out / f"hlo_{args.focus_arch}_bfloat16.txt.gz")

    predict = [
        py,
        "benchmarks/bench_predict.py",
        "--arch",
        *args.arch,
        "--strategy",
        "hybrid",
        "--repeats",
        "3",
        "--image",
        args.image,
        "--height",
        height,
        "--width",
        width,
        "--no_breakdown",
    ]
    predict_env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # PyTorch shares the card in this process
    if "predict" in jobs:
        suite.run(
            "predict bfloat16 (theirs float32)",
            predict + ["--dtype", "bfloat16", "--torch", "--authors_repo", args.authors_repo],
            300,
            predict_env,
        )
        suite.run("predict float32", predict + ["--dtype", "float32"], 300, predict_env)
    print("\n# job status")
    for name, state in suite.status:
        print(f"#   {name}: {state}")
    print_train_table(suite.results, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
