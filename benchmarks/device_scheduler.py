"""How `device_suite.py` runs its jobs on a lent GPU: `Suite` runs commands one after another within a
deadline, logging each and saving the parsed rows so far; `TurnGroup` lets benchmark processes compile
side by side and then gives the device to one at a time (see `device_turns.py`)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


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
