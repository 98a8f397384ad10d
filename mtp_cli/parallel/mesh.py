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

from mtp_cli.nn.comm import ParallelGroups
from mtp_cli.parallel.comm import DIST_COMM
from mtp_cli.plan.dims import ParallelDims

MESH_DIM_NAMES = ("pp", "dp", "cp", "tp")


@dataclass
class ParallelMesh:
    """The mesh and the handles the trainer and the model need."""

    dims: ParallelDims
    mesh: DeviceMesh
    dp_cp_mesh: DeviceMesh  # 1-D: what data parallel shards / replicates over
    cp_tp_mesh: DeviceMesh | None = None  # 1-D context x tensor (when both > 1)

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

    def model_groups(self, *, sequence_parallel: bool = False) -> ParallelGroups:
        """The groups the model's forward uses (None where that dimension has size 1), with the
        torch.distributed comm that reduces over them."""
        dims = self.dims
        return ParallelGroups(
            cp_group=self.group("cp") if dims.cp > 1 else None,
            pp_group=self.group("pp") if dims.pp > 1 else None,
            dp_cp_group=self.dp_cp_group if dims.dp_cp > 1 else None,
            comm=DIST_COMM,
            tp_cp_group=self.token_split_group(sequence_parallel=sequence_parallel),
        )

    def token_split_group(self, *, sequence_parallel: bool = False) -> dist.ProcessGroup | None:
        """The ranks that hold other tokens of the same micro-batch (Megatron's `tp_cp_group`
        as the MoE router uses it): context, times tensor under sequence parallel (without it
        the tensor ranks hold the same tokens). None when that is this rank alone."""
        dims = self.dims
        split_tp = sequence_parallel and dims.tp > 1
        if split_tp and dims.cp > 1:
            return self.cp_tp_mesh.get_group()
        if split_tp:
            return self.group("tp")
        return self.group("cp") if dims.cp > 1 else None


def build_mesh(dims: ParallelDims, device_type: str) -> ParallelMesh:
    """Create the (pp, dp, cp, tp) mesh over the initialised default process group."""
    shape = (dims.pp, dims.dp, dims.cp, dims.tp)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIM_NAMES)
    # data x context flattened into one dimension (torchtitan's dp_shard_cp)
    dp_cp_mesh = mesh["dp"] if dims.cp == 1 else mesh["dp", "cp"]._flatten("dp_cp")
    # context x tensor: the MoE router's token group under sequence parallel
    cp_tp_mesh = mesh["cp", "tp"]._flatten("cp_tp") if dims.cp > 1 and dims.tp > 1 else None
    return ParallelMesh(dims=dims, mesh=mesh, dp_cp_mesh=dp_cp_mesh, cp_tp_mesh=cp_tp_mesh)
