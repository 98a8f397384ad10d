"""Parallel layouts: the device mesh (data x pipeline x context x tensor) and data parallel.

Parallelism is applied to a plain model from outside (torchtitan style): `ParallelDims` checks
the sizes, `build_mesh` makes the named process groups, `apply_data_parallel` wraps the model
with DDP or shards it with FSDP2 over the data(-x-context)-parallel mesh.
"""

from mtp_cli.parallel.data_parallel import (
    apply_data_parallel,
    gradient_sync,
    unwrap_model,
)
from mtp_cli.parallel.dims import ParallelDims
from mtp_cli.parallel.mesh import ParallelMesh, build_mesh

__all__ = [
    "ParallelDims",
    "ParallelMesh",
    "apply_data_parallel",
    "build_mesh",
    "gradient_sync",
    "unwrap_model",
]
