"""Meshes, sharding rules and multi-host start-up, all on ``jax.sharding``.

The same training code runs on one CPU, on 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), on a GPU/TPU mesh, and
across hosts after :func:`initialize_distributed`. Batches are split along the
``data`` (and ``fsdp``) mesh axes; parameters are replicated unless a rule
(``(regex over the parameter path, PartitionSpec)``) or FSDP sharding says otherwise.
"""
from metafit.parallel.mesh import (
    MeshConfig,
    batch_sharding,
    initialize_distributed,
    make_mesh,
    mesh_axis_sizes,
    param_shardings,
    replicated,
    shard_batch,
    shard_params,
    to_global,
    to_host,
)

__all__ = [
    "MeshConfig", "make_mesh", "mesh_axis_sizes", "batch_sharding", "replicated", "param_shardings", "shard_batch",
    "shard_params", "to_global", "to_host", "initialize_distributed",
]
