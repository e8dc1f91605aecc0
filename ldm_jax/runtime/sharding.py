"""The device mesh and how arrays are laid out on it.

One code path for one device, many devices and many hosts: a `Mesh` with axes ("data", "fsdp")
built from all devices (`jax.devices()` spans hosts after `jax.distributed.initialize()`); the
batch is split over both axes; parameters and optimiser state are replicated, or with
`shard_params` split over "fsdp" along their largest divisible dimension (ZeRO-3 style).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all). data=-1 uses every device; an explicit
    data x fsdp smaller than the device count uses the first data x fsdp devices (one process)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must be >= 1 and divide the {n} devices")
    data = n // fsdp if data == -1 else data
    if data < 1 or data * fsdp > n or (data * fsdp < n and jax.process_count() > 1):
        raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} does not fit the {n} devices "
                         f"(use data=-1 for all of them)")
    return Mesh(np.array(devices[: data * fsdp]).reshape(data, fsdp), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis."""
    return NamedSharding(mesh, PartitionSpec(AXES))


def _fsdp_spec(shape, fsdp: int) -> PartitionSpec:
    if fsdp == 1 or not shape:
        return PartitionSpec()
    for axis in np.argsort(shape)[::-1]:  # largest dimension first
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def tree_shardings(tree, mesh: Mesh, shard_params: bool = False):
    """A NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs): replicated, or with
    `shard_params` split over "fsdp" along the largest dimension it divides."""
    fsdp = mesh.shape["fsdp"] if shard_params else 1
    return jax.tree.map(lambda x: NamedSharding(mesh, _fsdp_spec(tuple(np.shape(x)), fsdp)), tree)
