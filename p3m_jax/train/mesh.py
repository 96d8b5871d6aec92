"""The device mesh: one 1-D ``data`` axis over every device of every process.

The axis type is ``Auto`` (classic jit/GSPMD sharding propagation): jax.make_mesh defaults to
Explicit axes in this JAX version, which would put shardings into the types of every array.
Build meshes only through `make_mesh` so the choice is made in one place.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all devices of all
    processes, ``jax.devices()``), axis type Auto."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; the other axes replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated over the mesh."""
    return NamedSharding(mesh, P())


def _multi_process_environment() -> bool:
    """True where a launcher describes more than one process (explicit JAX variables, SLURM,
    Open MPI, or a multi-host Cloud TPU slice)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or int(env.get("JAX_NUM_PROCESSES", "1") or 1) > 1:
        return True
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if int(env.get(name, "1") or 1) > 1:
            return True
    # Cloud TPU VMs: one entry per host in TPU_WORKER_HOSTNAMES (or a Megascale slice).
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1 or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize_distributed_if_needed(**kwargs) -> bool:
    """Calls ``jax.distributed.initialize(**kwargs)`` when a multi-process launch is detected
    (or when ``kwargs`` are given explicitly), before any device is touched.

    Returns True when it initialized the distributed runtime, False otherwise (single process,
    or already initialized).
    """
    if jax.distributed.is_initialized():
        return False
    if not kwargs and not _multi_process_environment():
        return False
    # jax reads JAX_COORDINATOR_ADDRESS itself but not the process count and id: pass them on
    # (cluster launchers such as SLURM or a TPU pod are auto-detected by jax instead).
    for key, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if key not in kwargs and os.environ.get(name):
            kwargs[key] = int(os.environ[name])
    jax.distributed.initialize(**kwargs)
    return True


__all__ = ["DATA_AXIS", "make_mesh", "batch_sharding", "replicated", "initialize_distributed_if_needed"]
