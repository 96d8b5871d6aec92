"""Helpers of `device_suite.py`: the XLA:GPU autotuning cache carried between leases, XLA flag checks,
and the train-step table it prints."""

from __future__ import annotations

import os
import pathlib
import subprocess
import tarfile

REPO = pathlib.Path(__file__).resolve().parents[1]


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
    probe = subprocess.run(
        [python, "-c", "import jax; jax.numpy.ones(2).block_until_ready()"],
        env={**os.environ, "XLA_FLAGS": flags},
        capture_output=True,
        text=True,
        timeout=120,
    )
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
    """One table of every train-step row: ours (`bench_train_step.py`) and the authors' (`--torch_only`)."""
    print(f"\n# train steps at {size}x{size} on {_device_kind(results)}")
    print("arch | impl | precision | batch | step | img/s | TFLOP/s | MFU | compile | memory (compiled / peak)")
    for key, rows in results.items():
        if not key.startswith(("train", "torch")):
            continue
        for r in rows:
            if "impl" in r:  # the authors'
                timing = (
                    r["error"]
                    if "error" in r
                    else (
                        f"{r['step_s'] * 1e3:.1f} ms | {r['images_per_s']:.1f} | - | - | - | "
                        f"- / {r.get('peak_memory', 0) / 2**30:.1f}G"
                    )
                )
                line = f"{r['arch']} | PyTorch | {r['precision']} | {r['batch']} | {timing}"
            else:
                mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
                line = (
                    f"{r['arch']} | ours | {r['dtype']} | {r['global_batch']} | {r['step_s'] * 1e3:.1f} ms | "
                    f"{r['images_per_s']:.1f} | {r['tflops']:.1f} | {mfu} | {r['compile_s']:.0f}s | "
                    f"{r['memory'].get('total', 0) / 2**30:.1f}G / {r.get('peak_memory', 0) / 2**30:.1f}G"
                )
            print(line)


def _device_kind(results) -> str:
    for key, rows in results.items():
        if key.startswith("train") and rows:
            return rows[0].get("device_kind", "?")
    return "?"
