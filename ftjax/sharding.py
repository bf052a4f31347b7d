"""Device mesh and partition specs: data parallel x FSDP, one `jax.make_mesh` per run.

Changing the mesh shape is a config change, never a code change: parameters are sharded over the
"fsdp" axis on their largest divisible dimension (replicated when none divides), the batch over
("data", "fsdp") together. Axes are `AxisType.Auto`: XLA propagates shardings inside the jitted
step, and the step's in/out shardings are explicit at the jit call site.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")
BATCH = P(AXES)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """data: data-parallel replicas (-1: all devices not used by fsdp); fsdp: parameter shards."""

    data: int = -1
    fsdp: int = 1

    def __post_init__(self):
        if self.fsdp < 1 or (self.data < 1 and self.data != -1):
            raise ValueError(f"mesh sizes must be >= 1 (data may be -1), got {self}")


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    devices = list(jax.devices() if devices is None else devices)
    data = len(devices) // cfg.fsdp if cfg.data == -1 else cfg.data
    if data < 1 or data * cfg.fsdp > len(devices):
        raise ValueError(
            f"mesh data={cfg.data} x fsdp={cfg.fsdp} needs more than the "
            f"{len(devices)} available devices"
        )
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh(
        (data, cfg.fsdp), AXES, axis_types=auto, devices=devices[: data * cfg.fsdp]
    )


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest dimension that `fsdp` divides; replicate small or indivisible arrays."""
    if fsdp == 1 or not shape:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])
    return P()


def tree_shardings(tree, mesh: jax.sharding.Mesh):
    """NamedShardings for every array leaf of a parameter (or optimiser-state) tree."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp)), tree)


def param_sharding_fn(mesh: jax.sharding.Mesh):
    """`(name, shape) -> NamedSharding` for checkpoint loaders (`hf.load_checkpoint`'s
    `sharding_fn`): each parameter placed as `tree_shardings` would place it, as it is read."""
    return lambda name, shape: NamedSharding(mesh, param_spec(tuple(shape), mesh.shape["fsdp"]))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH)


def check_batch(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise ValueError(
            f"batch of {batch_size} is not divisible by the mesh's "
            f"data x fsdp = {shards} batch shards"
        )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_tree, mesh: jax.sharding.Mesh):
    """Assemble a batch from each process's own rows (multi-host: every process loads only its
    slice, in process order) into global arrays sharded over (data, fsdp). Single-process, the
    local rows are the whole batch."""
    spec = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(spec, np.asarray(x)),
                        local_tree)
