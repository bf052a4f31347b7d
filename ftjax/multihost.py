"""Multi-host runs: one process per host, each loading and reading back only its own batch rows.

Dims: B global batch rows, R rows held by this process's devices.

This is JAX's multi-controller runtime: every process runs the same program on the global mesh;
host-side work (data loading, scoring) touches only the rows of this process's devices. Which
rows those are follows the mesh (on TPU pod slices a host's devices need not be adjacent in mesh
order), so `batch_rows` asks the batch sharding instead of assuming one contiguous block.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from ftjax import sharding


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value is None else int(value)


def initialize(enabled: bool) -> None:
    """Join the multi-process run (a no-op when not `enabled` or already joined).

    `jax.distributed.initialize()` auto-detects Cloud TPU VMs, SLURM, Open MPI and Kubernetes, and
    reads `JAX_COORDINATOR_ADDRESS`; elsewhere set `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` too.
    """
    if not enabled or jax.distributed.is_initialized():
        return
    # Cross-process collectives for CPU devices (a localhost test run); recent JAX defaults to gloo
    # already, older versions had none and hung at the first cross-process CPU collective.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        num_processes=_env_int("JAX_NUM_PROCESSES"), process_id=_env_int("JAX_PROCESS_ID")
    )


def is_main() -> bool:
    """The process that writes logs (every process writes its shards of a checkpoint)."""
    return jax.process_index() == 0


def batch_rows(batch_size: int, mesh: jax.sharding.Mesh) -> np.ndarray:
    """Global indices (ascending) of the rows of a batch sharded over (data, fsdp) that this
    process's devices hold: the rows `sharding.global_batch` fills from this process's local data,
    in that order. One process: every row."""
    sharding.check_batch(batch_size, mesh)
    indices = sharding.batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    starts = sorted({index[0].start or 0 for index in indices.values()})
    if not starts:
        raise ValueError(
            f"process {jax.process_index()} has no device in the mesh {dict(mesh.shape)}; "
            "a multi-host mesh must use every process's devices"
        )
    per_device = batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
    return np.concatenate([np.arange(start, start + per_device) for start in starts])


def host_rows(array_B: jax.Array, mesh: jax.sharding.Mesh) -> np.ndarray:
    """This process's rows (`batch_rows`) of a global array, as a NumPy array: the inverse of
    `sharding.global_batch`."""
    array_B = jax.device_put(array_B, sharding.batch_sharding(mesh))  # no-op when so sharded
    shards = {shard.index[0].start or 0: shard.data for shard in array_B.addressable_shards}
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])
