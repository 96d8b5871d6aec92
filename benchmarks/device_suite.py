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
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

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


class Suite:
    """Runs jobs one after another within a deadline, logging each and saving the rows so far."""

    def __init__(self, out: pathlib.Path, budget: float):
        self.out, self.deadline = out, time.monotonic() + budget
        self.log = out / "suite.log"
        self.results: dict[str, object] = {}
        self.status: list[tuple[str, str]] = []
        self.after_each_job = lambda: None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(
        self, name: str, cmd: list[str], limit: float, env: dict | None = None, json_path=None, min_left: float = 30
    ) -> bool:
        """Runs one job; True when it exited 0. Skipped when less than `min_left` seconds remain."""
        limit = min(limit, self.left())
        if limit < min_left:
            self.status.append((name, "skipped (time)"))
            print(f"== {name}: skipped, {self.left():.0f}s left", flush=True)
            return False
        print(f"== {name} (limit {limit:.0f}s): {' '.join(cmd)}", flush=True)
        start = time.monotonic()
        with open(self.log, "a") as log:
            log.write(f"\n== {name}: {' '.join(cmd)}\n")
            log.flush()
            try:
                proc = subprocess.run(
                    cmd,
                    cwd=REPO,
                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=limit,
                )
                text, code = proc.stdout, proc.returncode
            except subprocess.TimeoutExpired as err:
                text = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
                code = "timeout"
            log.write(text)
        seconds = time.monotonic() - start
        ok = code == 0
        print("\n".join(_kept_lines(text, ok)), flush=True)
        self.status.append((name, f"{'ok' if ok else 'FAILED (' + str(code) + ')'} in {seconds:.0f}s"))
        if ok and json_path and pathlib.Path(json_path).exists():
            self.results[name] = json.loads(pathlib.Path(json_path).read_text())
        self.results["_status"] = self.status
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        self.after_each_job()
        return ok


class TurnGroup:
    """Benchmark processes that compile side by side, then take the device one at a time.

    XLA:GPU spends minutes compiling and autotuning each train step, mostly on the host's cores,
    while the card idles. So the jobs of a group start in the order they were added, several
    compiling at once; each announces that it has compiled (`device_turns.wait_for_device_turn`)
    and waits. Once all have compiled (or `compile_limit` seconds have passed; those still compiling
    are stopped), the group gives the device to one job after another, in the same order, so no
    timing shares the card with another job's work. The suite's budget cuts the turns that no
    longer fit.
    """

    def __init__(self, suite: Suite, folder: pathlib.Path, min_turn_s: float = 15, reserve_s: float = 10):
        """`min_turn_s`: a turn shorter than this is not started; `reserve_s`: seconds of the budget kept
        for collecting the results after the last turn."""
        self.suite, self.folder = suite, folder
        self.min_turn_s, self.reserve_s = min_turn_s, reserve_s
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.jobs: list[dict] = []

    def add(
        self,
        name: str,
        cmd: list[str],
        env: dict,
        json_path: pathlib.Path,
        compiles: bool = True,
        niceness: int = 0,
        turn_limit: float = 90,
    ) -> None:
        """A job; `compiles` False for one that only waits for its turn (the authors' PyTorch steps),
        `niceness` for the host's scheduler (lower-priority jobs should not slow the first ones' compiles)."""
        self.jobs.append(
            {
                "name": name,
                "cmd": cmd,
                "env": env,
                "json": json_path,
                "compiles": compiles,
                "niceness": niceness,
                "turn_limit": turn_limit,
            }
        )

    def _marker(self, kind: str, job: dict) -> pathlib.Path:
        return self.folder / f"{kind}.{job['proc'].pid}"

    def run(self, compile_limit: float, parallel_compiles: int = 3) -> None:
        """Compiles (at most `parallel_compiles` jobs at once, in the order added) until all are
        ready or `compile_limit` seconds have passed, then gives each ready job its turn."""
        start = time.monotonic()
        self._compile_phase(start + min(compile_limit, self.suite.left()), parallel_compiles)
        print(f"# compile phase over after {time.monotonic() - start:.0f}s", flush=True)
        self.suite.after_each_job()
        for job in self.jobs:
            if "proc" in job and "state" not in job and job["proc"].poll() is None:
                self._turn(job)
        # The jobs still reading their profiles on the host.
        for job in self.jobs:
            if "proc" not in job:
                continue
            try:
                job["proc"].wait(timeout=max(1.0, self.suite.left()))
            except subprocess.TimeoutExpired:
                job["proc"].kill()
                job["proc"].wait()
                job.setdefault("state", "stopped: out of time after its turn")
        for job in self.jobs:
            self._collect(job)
        self.suite.after_each_job()

    def _start(self, job: dict) -> None:
        job["log"] = self.folder / (job["name"].replace(" ", "_") + ".log")
        print(f"== {job['name']} (started; nice {job['niceness']}): {' '.join(job['cmd'])}", flush=True)
        with open(job["log"], "w") as log:
            job["proc"] = subprocess.Popen(
                ["nice", "-n", str(job["niceness"])] + job["cmd"],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "P3M_BENCH_TURN_DIR": str(self.folder), **job["env"]},
            )

    def _compiling(self) -> list[dict]:
        return [
            j
            for j in self.jobs
            if j["compiles"] and "proc" in j and j["proc"].poll() is None and not self._marker("ready", j).exists()
        ]

    def _compile_phase(self, end: float, parallel_compiles: int) -> None:
        # Too many compilations at once starve each other of the host's cores (eight on 16
        # cores: none of Swin-T's or ViTAE-S's finished in 274 s); a job that has compiled
        # waits idle, so the next one starts then. Jobs that only wait take no slot.
        waiting = list(self.jobs)
        while time.monotonic() < end:
            while waiting and (not waiting[0]["compiles"] or len(self._compiling()) < parallel_compiles):
                self._start(waiting.pop(0))
            if not waiting and not self._compiling():
                return
            time.sleep(1)
        for job in self._compiling():
            job["proc"].kill()
            job["state"] = "stopped: still compiling at the compile limit"
        for job in waiting:
            job["state"] = "not started: the compile limit came first"

    def _turn(self, job: dict) -> None:
        """Gives `job` the device until it is done with it, exits, or overruns its turn."""
        proc, asked = job["proc"], time.monotonic()
        while proc.poll() is None and not self._marker("ready", job).exists() and time.monotonic() - asked < 60:
            time.sleep(0.2)  # a job that only waits may still be importing
        limit = min(job["turn_limit"], self.suite.left() - self.reserve_s)
        if proc.poll() is not None:
            return
        if limit < self.min_turn_s or not self._marker("ready", job).exists():
            proc.kill()
            job["state"] = "skipped (time)" if limit < self.min_turn_s else "stopped: never ready"
            return
        turn_start = time.monotonic()
        print(f"== {job['name']}: its turn on the device (limit {limit:.0f}s)", flush=True)
        self._marker("turn", job).touch()
        while proc.poll() is None and not self._marker("done", job).exists():
            if time.monotonic() - turn_start > limit:
                proc.kill()
                job["state"] = f"stopped: its turn passed {limit:.0f}s"
                break
            time.sleep(0.2)
        job["turn_s"] = time.monotonic() - turn_start

    def _collect(self, job: dict) -> None:
        suite = self.suite
        if "proc" not in job:
            suite.status.append((job["name"], job["state"]))
            return
        code = job["proc"].returncode
        text = job["log"].read_text(errors="replace")
        with open(suite.log, "a") as log:
            log.write(f"\n== {job['name']}: {' '.join(job['cmd'])}\n{text}")
        ok = code == 0 and "state" not in job
        print(f"== {job['name']}", flush=True)
        print("\n".join(_kept_lines(text, ok)), flush=True)
        turn = f", turn {job['turn_s']:.0f}s" if "turn_s" in job else ""
        suite.status.append((job["name"], job.get("state", "ok" if ok else f"FAILED ({code})") + turn))
        if ok and job["json"].exists():
            suite.results[job["name"]] = json.loads(job["json"].read_text())
        suite.results["_status"] = suite.status
        (suite.out / "results.json").write_text(json.dumps(suite.results, indent=1, default=str))


def _kept_lines(text: str, ok: bool) -> list[str]:
    """The table lines of a job's output, and on failure its last lines (the whole output is in suite.log)."""
    lines = text.splitlines()
    keep = [ln for ln in lines if "|" in ln or ln.startswith(("#", "machine", "GPU", "jax", "name"))]
    keep = [ln for ln in keep if "cuda_timer" not in ln]  # the autotuner's timing warnings
    return keep if ok else keep + [ln for ln in lines[-15:] if ln not in keep]


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
