"""The device mesh: named process groups for pipeline x data x context x tensor parallel.

One `init_device_mesh` call makes every group; the dimension order (pp, dp, cp, tp) puts the
tensor-parallel ranks, which talk most, next to each other (same node), as Megatron and
torchtitan do. Data parallel (DDP or FSDP2) runs over `dp_cp`, the data x context ranks that
hold the same weights and see different tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mtp_cli.models.comm import ParallelGroups
from mtp_cli.parallel.comm import DIST_COMM
from mtp_cli.plan.dims import ParallelDims

MESH_DIM_NAMES = ("pp", "dp", "cp", "tp")


@dataclass
class ParallelMesh:
    """The mesh and the handles the trainer and the model need."""

    dims: ParallelDims
    mesh: DeviceMesh
    dp_cp_mesh: DeviceMesh  # 1-D: what data parallel shards / replicates over

    def group(self, name: str) -> dist.ProcessGroup:
        return self.mesh[name].get_group()

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")

    @property
    def cp_rank(self) -> int:
        return self.mesh.get_local_rank("cp")

    @property
    def dp_cp_group(self) -> dist.ProcessGroup:
        return self.dp_cp_mesh.get_group()

    def model_groups(self) -> ParallelGroups:
        """The groups the model's forward uses (None where that dimension has size 1), with the
        torch.distributed comm that reduces over them."""
        dims = self.dims
        return ParallelGroups(
            cp_group=self.group("cp") if dims.cp > 1 else None,
            pp_group=self.group("pp") if dims.pp > 1 else None,
            dp_cp_group=self.dp_cp_group if dims.dp_cp > 1 else None,
            comm=DIST_COMM,
        )


def build_mesh(dims: ParallelDims, device_type: str) -> ParallelMesh:
    """Create the (pp, dp, cp, tp) mesh over the initialised default process group."""
    shape = (dims.pp, dims.dp, dims.cp, dims.tp)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIM_NAMES)
    # data x context flattened into one dimension (torchtitan's dp_shard_cp)
    dp_cp_mesh = mesh["dp"] if dims.cp == 1 else mesh["dp", "cp"]._flatten("dp_cp")
    return ParallelMesh(dims=dims, mesh=mesh, dp_cp_mesh=dp_cp_mesh)
