"""The one owner of process groups: pipeline x data x context x tensor, and the groups carved
from them (data x context, context x tensor, expert, expert-data, embedding).

One `init_device_mesh` call makes the four dimensions; the dimension order (pp, dp, cp, tp) puts
the tensor-parallel ranks, which talk most, next to each other (same node), as Megatron and
torchtitan do. Data parallel (DDP or FSDP2) runs over `dp_cp`, the data x context ranks that
hold the same weights and see different tokens. The expert and embedding groups are made here
too, on first request and once (creating a group is collective: every rank asks for the same
ones in the same order), so no other module calls `new_group` or builds a `DeviceMesh`. The
default group itself is initialised by the worker's entry (`mtp_cli.launch.distributed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mtp_cli.nn.comm import ParallelGroups
from mtp_cli.parallel.comm import DIST_COMM
from mtp_cli.plan.dims import ParallelDims

MESH_DIM_NAMES = ("pp", "dp", "cp", "tp")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the default process group, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


@dataclass
class ExpertParallelGroups:
    """This rank's expert-parallel and expert-data-parallel groups (None: one member)."""

    ep_size: int
    ep_rank: int
    ep_group: dist.ProcessGroup | None
    edp_group: dist.ProcessGroup | None
    dp_cp_size: int


def dp_cp_rank_lists(dims: ParallelDims) -> list[list[int]]:
    """The global ranks of every data x context group, in the (pp, dp, cp, tp) mesh's order
    (row major; data x context flattened data-major)."""
    lists = []
    for p in range(dims.pp):
        for t in range(dims.tp):
            lists.append([((p * dims.dp + d) * dims.cp + c) * dims.tp + t
                          for d in range(dims.dp) for c in range(dims.cp)])
    return lists


@dataclass
class ParallelMesh:
    """The mesh and the handles the trainer and the model need."""

    dims: ParallelDims
    mesh: DeviceMesh
    dp_cp_mesh: DeviceMesh  # 1-D: what data parallel shards / replicates over
    cp_tp_mesh: DeviceMesh | None = None  # 1-D context x tensor (when both > 1)
    # the groups made on request, by what was asked (each made once)
    made: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)

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

    def expert_groups(self, ep: int) -> ExpertParallelGroups:
        """This rank's expert-parallel group (blocks of `ep` consecutive data x context ranks)
        and expert-data-parallel group (the ranks `ep` apart: those holding the same experts).
        Collective the first time: every rank creates every group, in the same order."""
        key = ("expert", ep)
        if key not in self.made:
            self.made[key] = self._make_expert_groups(ep)
        return self.made[key]

    def _make_expert_groups(self, ep: int) -> ExpertParallelGroups:
        rank = dist.get_rank()
        mine: dict[str, dist.ProcessGroup | None] = {"ep": None, "edp": None}
        ep_rank = 0
        for ranks in dp_cp_rank_lists(self.dims):
            blocks = [ranks[i:i + ep] for i in range(0, len(ranks), ep)]
            strided = [ranks[j::ep] for j in range(ep)]
            for kind, members_list in (("ep", blocks), ("edp", strided)):
                for members in members_list:
                    group = dist.new_group(members) if len(members) > 1 else None
                    if rank in members:
                        mine[kind] = group
                        if kind == "ep":
                            ep_rank = members.index(rank)
        return ExpertParallelGroups(ep_size=ep, ep_rank=ep_rank, ep_group=mine["ep"],
                                    edp_group=mine["edp"], dp_cp_size=self.dims.dp_cp)

    def expert_data_mesh(self, ep: int) -> DeviceMesh:
        """This rank's 1-D expert-data-parallel mesh (the ranks holding the same experts, size
        data x context / EP, possibly 1), for FSDP2 over the experts. Collective the first
        time: every rank builds the same (pp, edp, ep, tp) mesh, whose data x context index is
        `edp * ep + ep_rank` as in `expert_groups`."""
        key = ("expert_data_mesh", ep)
        if key not in self.made:
            dims = self.dims
            ranks = torch.arange(dims.world_size).reshape(dims.pp, dims.dp_cp // ep, ep, dims.tp)
            mesh = DeviceMesh(self.mesh.device_type, ranks,
                              mesh_dim_names=("pp", "edp", "ep", "tp"))
            self.made[key] = mesh["edp"]
        return self.made[key]

    def embedding_group(self, holders: Sequence[int]
                        ) -> tuple[dist.ProcessGroup | None, list[int]] | None:
        """This rank's group among the pipeline ranks `holders` (those holding the embedding
        or a copy), one group per (data, context, tensor) coordinate, and its members' global
        ranks (first: the lowest pipeline rank); None when this rank holds none. Collective the
        first time: every rank takes part in creating all of them."""
        key = ("embedding", tuple(sorted(holders)))
        if key not in self.made:
            self.made[key] = self._make_embedding_group(key[1])
        return self.made[key]

    def _make_embedding_group(self, holders: tuple[int, ...]
                              ) -> tuple[dist.ProcessGroup | None, list[int]] | None:
        ranks = self.mesh.mesh  # global ranks, shape (pp, dp, cp, tp)
        me = dist.get_rank()
        mine = None
        for coordinate in torch.cartesian_prod(*[torch.arange(n) for n in ranks.shape[1:]]) \
                .reshape(-1, 3).tolist():
            members = [int(ranks[(p, *coordinate)]) for p in holders]
            group = dist.new_group(members) if len(members) > 1 else None
            if me in members:
                mine = (group, members)
        return mine


def build_mesh(dims: ParallelDims, device_type: str) -> ParallelMesh:
    """Create the (pp, dp, cp, tp) mesh over the initialised default process group."""
    shape = (dims.pp, dims.dp, dims.cp, dims.tp)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIM_NAMES)
    # data x context flattened into one dimension (torchtitan's dp_shard_cp)
    dp_cp_mesh = mesh["dp"] if dims.cp == 1 else mesh["dp", "cp"]._flatten("dp_cp")
    # context x tensor: the MoE router's token group under sequence parallel
    cp_tp_mesh = mesh["cp", "tp"]._flatten("cp_tp") if dims.cp > 1 and dims.tp > 1 else None
    return ParallelMesh(dims=dims, mesh=mesh, dp_cp_mesh=dp_cp_mesh, cp_tp_mesh=cp_tp_mesh)
