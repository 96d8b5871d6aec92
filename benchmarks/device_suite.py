"""GPU measurements for one short device lease: train steps, inference and evaluation, ours and the authors'.

    python benchmarks/device_suite.py --out DIR [--budget 540] [--batch 32] [--arch resnet34 swin_t vitae_s] \
        [--jobs train torch predict evaluate fp32 bigger] [--authors_repo DIR] [--image PHOTO]

Made for a GPU lent for a few minutes: it runs the benchmark commands below as separate processes, in order of
priority, each with its own time limit, and skips what no longer fits in `--budget` seconds. Every job's output is
appended to DIR/suite.log as it runs, and the parsed rows go to DIR/results.json after every job, so a call cut
short still leaves what finished. The last thing printed is one table of the train steps.

Jobs, in this order (`--jobs` picks some; `--arch` the variants and their order):
  env       GPU name and memory; jax, flax, optax and torch versions
  train     `p3m_jax.benchmark` per variant: 512x512, per-device batch --batch, bfloat16 (then --batch / 2 if
            that runs out of memory), and the time per op of one more step under the profiler. When the
            first variant fails for another reason, the suite stops.
  torch     the authors' step alone (`p3m_jax.benchmark --torch_only`), same size and batch, float32 and
            autocast float16, after each variant's own
  predict   `benchmarks/bench_predict.py`, HYBRID at 1080x1620: bfloat16 with the authors' (float32) beside
            it, then float32
  evaluate  `benchmarks/bench_eval_throughput.py`: images/s on 512x512 synthetic portraits, float32, bfloat16
  fp32      `p3m_jax.benchmark`, float32, at the batch that ran in bfloat16
  bigger    the first variant in bfloat16 at twice --batch
Our processes get XLA_PYTHON_CLIENT_MEM_FRACTION=0.92. The authors' train steps run in processes of their own,
so the two frameworks never share the card's memory.

Autotuning results. Our processes keep XLA:GPU's per-fusion autotuning results in --autotune_cache, and the
suite packs them into DIR/xla_autotune.tgz after every job. Copy that file to .devrun/xla_autotune.tgz and carry
.devrun to the next lease: its compilations then skip the autotuning that is already done (the results are keyed
per fusion and GPU, so they stay valid across most code changes). Compile times from such a run are not cold.

Budget for compilation. On an H200 (jax 0.11.2), XLA:GPU took 120 s to compile and autotune ResNet-34's
bfloat16 train step at batch 32, and more than 190 s for Swin-T's. The authors' two ResNet-34 steps took 68 s
together. A 15-minute lease therefore holds about three variants' train jobs; pick the rest with --jobs in a
later lease.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import time

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
        self.out_of_memory = False  # whether the last job failed for want of device memory
        self.timed_out = False  # whether the last job ran out of time
        self.after_each_job = lambda: None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], limit: float, env: dict | None = None, json_path=None,
            min_left: float = 30) -> bool:
        """Runs one job; True when it exited 0. Skipped when less than `min_left` seconds remain."""
        limit = min(limit, self.left())
        if limit < min_left:
            self.status.append((name, "skipped (time)"))
            self.timed_out, self.out_of_memory = True, False
            print(f"== {name}: skipped, {self.left():.0f}s left", flush=True)
            return False
        print(f"== {name} (limit {limit:.0f}s): {' '.join(cmd)}", flush=True)
        start = time.monotonic()
        with open(self.log, "a") as log:
            log.write(f"\n== {name}: {' '.join(cmd)}\n")
            log.flush()
            try:
                proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=limit)
                text, code = proc.stdout, proc.returncode
            except subprocess.TimeoutExpired as err:
                text = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
                code = "timeout"
            log.write(text)
        seconds = time.monotonic() - start
        ok = code == 0
        self.timed_out = code == "timeout"
        self.out_of_memory = not ok and any(k in text for k in ("RESOURCE_EXHAUSTED", "out of memory",
                                                                 "Out of memory"))
        # The table lines and the error's last lines; the whole output is in suite.log.
        lines = text.splitlines()
        keep = [ln for ln in lines if "|" in ln or ln.startswith(("#", "machine", "GPU", "jax", "name"))]
        keep = [ln for ln in keep if "cuda_timer" not in ln]  # the autotuner's timing warnings
        print("\n".join(keep if ok else keep + lines[-15:]), flush=True)
        self.status.append((name, f"{'ok' if ok else 'FAILED (' + str(code) + ')'} in {seconds:.0f}s"))
        if ok and json_path and pathlib.Path(json_path).exists():
            self.results[name] = json.loads(pathlib.Path(json_path).read_text())
        self.results["_status"] = self.status
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        self.after_each_job()
        return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
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
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=JOBS,
                        help="which jobs (always in the order of the list above)")
    parser.add_argument("--autotune_cache", default="/tmp/xla_autotune",
                        help="XLA:GPU's per-fusion autotuning results go here, packed into "
                        "OUT/xla_autotune.tgz after every job; a .devrun/xla_autotune.tgz carried from an "
                        "earlier lease is unpacked here first ('' for none)")
    parser.add_argument("--xla_flags", default="",
                        help="more XLA_FLAGS for our processes, for an A/B against a plain run, e.g. "
                        "--xla_flags=--xla_gpu_enable_triton_gemm=false (the flags are tried first; compare "
                        "compile times with --autotune_cache '' on both sides)")
    parser.add_argument("--train_limit", type=float, default=330,
                        help="seconds per train-step job; XLA:GPU compiles and autotunes for minutes")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path("/tmp/device_suite")
    scratch.mkdir(parents=True, exist_ok=True)
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
    bench = [py, "-m", "p3m_jax.benchmark", "--size", str(args.size)]
    height, width = args.predict_size.split("x")
    jobs = set(args.jobs)

    suite.run("env", ["bash", "-c", "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm "
                      "--format=csv; " + py + " -c 'import jax, flax, optax, torch; print(\"jax\", jax.__version__, "
                      "\"flax\", flax.__version__, \"optax\", optax.__version__, \"torch\", torch.__version__, "
                      "jax.devices())'"], 60, min_left=5)

    def train(arch, dtype, batches, profile=False):
        """The first batch of `batches` that runs; a failure other than running out of memory is final.
        With `profile`, one more step runs under the profiler and the time per op is printed."""
        for batch in batches:
            path = scratch / f"train_{arch}_{dtype}_{batch}.json"
            extra = ["--profile", str(scratch / "profile")] if profile else []
            if suite.run(f"train {arch} {dtype} b{batch}", bench + [
                    "--arch", arch, "--batch", str(batch), "--dtype", dtype, "--repeats", "10",
                    "--json", str(path)] + extra, args.train_limit, ours_env, path):
                return batch
            if not suite.out_of_memory:
                return None
        return None

    def torch_step(arch, batch):
        path = scratch / f"torch_{arch}_{batch}.json"
        suite.run(f"torch {arch} b{batch}", bench + [
            "--torch_only", "--torch_device", args.torch_device, "--torch_precision", "float32", "float16",
            "--arch", arch, "--batch", str(batch), "--repeats", "10", "--authors_repo", args.authors_repo,
            "--json", str(path)], 150, None, path)

    fitted = {arch: args.batch for arch in args.arch}
    for arch in args.arch:
        if "train" in jobs:
            fitted[arch] = train(arch, "bfloat16", (args.batch, args.batch // 2), profile=True)
            if arch == args.arch[0] and not fitted[arch] and not suite.timed_out:
                print("our first train step failed: stopping (see suite.log)", flush=True)
                return 1
        if "torch" in jobs and fitted[arch]:
            torch_step(arch, fitted[arch])
    predict = [py, "benchmarks/bench_predict.py", "--arch", *args.arch, "--strategy", "hybrid", "--repeats", "3",
               "--image", args.image, "--height", height, "--width", width, "--no_breakdown"]
    predict_env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # PyTorch shares the card in this process
    if "predict" in jobs:
        suite.run("predict bfloat16 (theirs float32)", predict + [
            "--dtype", "bfloat16", "--torch", "--authors_repo", args.authors_repo], 300, predict_env)
        suite.run("predict float32", predict + ["--dtype", "float32"], 300, predict_env)
    if "evaluate" in jobs:
        path = scratch / "evaluate.json"
        suite.run("evaluate", [py, "benchmarks/bench_eval_throughput.py", "--arch", *args.arch,
                               "--images", str(args.eval_images), "--height", str(args.eval_size),
                               "--width", str(args.eval_size), "--json", str(path)], 300, ours_env, path)
    if "fp32" in jobs:
        for arch in args.arch:
            if fitted[arch]:
                train(arch, "float32", (fitted[arch],))
    if "bigger" in jobs:
        train(args.arch[0], "bfloat16", (2 * args.batch,))

    print("\n# job status")
    for name, state in suite.status:
        print(f"#   {name}: {state}")
    print_train_table(suite.results, args.size)
    return 0


def autotune_flag(folder: str) -> str:
    return f"--xla_gpu_per_fusion_autotune_cache_dir={folder}"


def with_xla_flags(*flags: str) -> str:
    """The environment's XLA_FLAGS followed by `flags` (each may be empty or hold several)."""
    return " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), *flags) if f)


def use_autotune_cache(folder: str, python: str) -> bool:
    """Whether to keep XLA:GPU's autotuning results in `folder` (filled from a carried
    .devrun/xla_autotune.tgz when there is one): not when `folder` is '', nor when this XLA does
    not know the flag (an unknown flag in XLA_FLAGS aborts the process, so it is tried first)."""
    if not folder:
        return False
    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
    carried = REPO / ".devrun/xla_autotune.tgz"
    if carried.exists():
        with tarfile.open(carried) as archive:
            archive.extractall(folder, filter="data")
        print(f"# autotuning cache: {len(list(pathlib.Path(folder).iterdir()))} entries from {carried}", flush=True)
    if not xla_flags_accepted(with_xla_flags(autotune_flag(folder)), python):
        print(f"# autotuning cache off: this XLA refused {autotune_flag(folder)}", flush=True)
        return False
    return True


def xla_flags_accepted(flags: str, python: str) -> bool:
    """Whether a process starts with XLA_FLAGS=`flags` (XLA aborts on a flag it does not know)."""
    probe = subprocess.run([python, "-c", "import jax; jax.numpy.ones(2).block_until_ready()"],
                           env={**os.environ, "XLA_FLAGS": flags}, capture_output=True, text=True, timeout=120)
    return probe.returncode == 0


def pack_autotune_cache(folder: str, archive: pathlib.Path) -> None:
    """Packs `folder` into `archive` (written whole, then renamed, so a cut-short call leaves the
    previous archive rather than half a new one)."""
    partial = archive.with_suffix(".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for entry in sorted(pathlib.Path(folder).iterdir()):
            tar.add(entry, arcname=entry.name)
    partial.replace(archive)


def print_train_table(results: dict, size: int) -> None:
    """One table of every train-step row: ours (`p3m_jax.benchmark`) and the authors' (`--torch_only`)."""
    print(f"\n# train steps at {size}x{size} on {_device_kind(results)}")
    print("arch | impl | precision | batch | step | img/s | TFLOP/s | MFU | compile | memory (compiled / peak)")
    for key, rows in results.items():
        if not key.startswith(("train", "torch")):
            continue
        for r in rows:
            if "impl" in r:  # the authors'
                timing = r["error"] if "error" in r else (
                    f"{r['step_s'] * 1e3:.1f} ms | {r['images_per_s']:.1f} | - | - | - | "
                    f"- / {r.get('peak_memory', 0) / 2**30:.1f}G")
                line = f"{r['arch']} | PyTorch | {r['precision']} | {r['batch']} | {timing}"
            else:
                mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
                line = (f"{r['arch']} | ours | {r['dtype']} | {r['global_batch']} | {r['step_s'] * 1e3:.1f} ms | "
                        f"{r['images_per_s']:.1f} | {r['tflops']:.1f} | {mfu} | {r['compile_s']:.0f}s | "
                        f"{r['memory'].get('total', 0) / 2**30:.1f}G / {r.get('peak_memory', 0) / 2**30:.1f}G")
            print(line)


def _device_kind(results) -> str:
    for key, rows in results.items():
        if key.startswith("train") and rows:
            return rows[0].get("device_kind", "?")
    return "?"


if __name__ == "__main__":
    sys.exit(main())
