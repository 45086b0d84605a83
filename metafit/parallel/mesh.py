"""Device meshes from config and the placement of batches and parameters on them."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from metafit.tree import path_name

AXES = ("data", "fsdp", "tensor")


@dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; exactly one may be -1, meaning "all remaining devices".

    Attributes:
      data: data-parallel replicas (the batch is split across them).
      fsdp: fully-sharded data parallel: batch split too, and parameters sharded
        along their largest divisible dimension.
      tensor: tensor-parallel axis, used by parameter rules.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


def mesh_axis_sizes(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """The size of each mesh axis for ``num_devices`` devices (a ``-1`` axis takes the rest).

    Pure and device-free, so a run can check its ``mesh:`` section before it writes anything.

    Raises:
      ValueError: naming the axis (``mesh.data``, ...) when a size is 0 or below -1, more than
        one axis is -1, or the sizes do not multiply to ``num_devices``.
    """
    sizes = {axis: getattr(cfg, axis) for axis in AXES}
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{axis}: axis sizes must be positive or -1 (all remaining devices), got {size}")
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {sizes}")
    known = math.prod(s for s in sizes.values() if s != -1)
    for axis, size in sizes.items():
        if size == -1:
            if num_devices % known:
                raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes ({known})")
            sizes[axis] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh {sizes} needs {math.prod(sizes.values())} devices but {num_devices} are available; "
            "set one axis to -1 to use the rest"
        )
    return sizes


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ``Mesh`` with axes ``('data', 'fsdp', 'tensor')`` over all (global) devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_axis_sizes(cfg or MeshConfig(), len(devices))
    return Mesh(np.asarray(devices).reshape([sizes[axis] for axis in AXES]), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Shards dimension ``leading`` of an array over the ``data`` and ``fsdp`` axes."""
    return NamedSharding(mesh, P(*([None] * leading), ("data", "fsdp")))


def to_global(value: Any, sharding: NamedSharding) -> jax.Array:
    """Places a host array that every process holds in full onto a (possibly multi-host) sharding."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def shard_batch(batch: Any, mesh: Mesh, leading: int = 0) -> Any:
    """Places each array of a host batch pytree, split along dimension ``leading``."""

    def place(x):
        x = np.asarray(x)
        n = mesh.shape["data"] * mesh.shape["fsdp"]
        if x.ndim <= leading or x.shape[leading] % n:
            return to_global(x, replicated(mesh))
        return to_global(x, batch_sharding(mesh, leading))

    return jax.tree.map(place, batch)


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[tuple[str, tuple]] = ()) -> Any:
    """A pytree of ``NamedSharding`` for ``params``.

    Args:
      params: parameter pytree.
      mesh: the mesh.
      rules: ``(regex, spec)`` pairs; the first regex that matches the '/'-joined
        parameter path gives its ``PartitionSpec(*spec)``. Without a match a leaf is
        sharded on ``fsdp`` along its largest divisible dimension (if the axis has
        more than one device), else replicated.
    """
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def choose(path, leaf):
        name = path_name(path, sep="/")
        for pattern, spec in compiled:
            if pattern.search(name):
                return NamedSharding(mesh, P(*spec))
        return NamedSharding(mesh, _fsdp_spec(np.shape(leaf), mesh.shape["fsdp"]))

    return jax.tree_util.tree_map_with_path(choose, params)


def _fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    if fsdp == 1 or not shape:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            return P(*([None] * dim), "fsdp")
    return P()


def shard_params(params: Any, mesh: Mesh, rules: Sequence[tuple[str, tuple]] = ()) -> Any:
    """Places ``params`` (identical on every process) according to :func:`param_shardings`."""
    shardings = param_shardings(params, mesh, rules)
    return jax.tree.map(lambda x, s: to_global(x, s), params, shardings)


def to_host(x: Any) -> np.ndarray:
    """Reads a (possibly multi-host, replicated) array back to numpy on this process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise ValueError("to_host needs a replicated array when it spans several processes")
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def initialize_distributed(coordinator: str, num_processes: int, process_id: int, *, cpu: bool = False) -> None:
    """Starts multi-process JAX (one process per host, or several on localhost for tests).

    Args:
      coordinator: ``host:port`` of process 0.
      num_processes: total number of processes.
      process_id: this process's index.
      cpu: use gloo collectives so CPU devices of several processes form one mesh.
    """
    if cpu:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
