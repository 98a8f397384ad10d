"""`ModelComm` over torch.distributed: the collectives the model's forward and loss may need.

The model calls the protocol of `mtp_cli.nn.comm` with opaque group handles; here those
handles are `torch.distributed` process groups. The seam is injected from here, never looked up
from below: the parallel transforms set `DIST_COMM` at the model's seams (`GPTModel.groups`,
`VocabParallelOutputHead.comm`), and importing this module (every transform and the mesh do)
installs it as the comm that `mtp_cli.nn.comm.comm_for` gives a raw process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mtp_cli.nn.comm import Group, ReduceOp, install_group_comm

_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "max": dist.ReduceOp.MAX,
        "min": dist.ReduceOp.MIN}


class TorchDistComm:
    """`mtp_cli.nn.comm.ModelComm` with torch.distributed (gloo and nccl alike)."""

    def size(self, group: Group) -> int:
        return 1 if group is None else dist.get_world_size(group)

    def rank(self, group: Group) -> int:
        return 0 if group is None else dist.get_rank(group)

    def all_reduce(self, tensor: torch.Tensor, group: Group, op: ReduceOp = "sum"
                   ) -> torch.Tensor:
        if self.size(group) > 1:
            dist.all_reduce(tensor, op=_OPS[op], group=group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, group: Group) -> list[torch.Tensor]:
        if self.size(group) == 1:
            return [tensor]
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size(group))]
        dist.all_gather(parts, tensor, group=group)
        return parts

    def broadcast(self, tensor: torch.Tensor, group: Group, src: int = 0) -> torch.Tensor:
        if self.size(group) > 1:
            dist.broadcast(tensor, src=dist.get_global_rank(group, src), group=group)
        return tensor

    def exchange_with_neighbours(self, to_prev: torch.Tensor, to_next: torch.Tensor,
                                 group: Group) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Batched isend/irecv pairs, posted in the same order on both sides of each link."""
        rank, size = self.rank(group), self.size(group)
        from_next = torch.empty_like(to_prev) if rank < size - 1 else None
        from_prev = torch.empty_like(to_next) if rank > 0 else None
        ops = []
        if rank > 0:
            prev_peer = dist.get_global_rank(group, rank - 1)
            ops.append(dist.P2POp(dist.isend, to_prev.contiguous(), prev_peer, group))
            ops.append(dist.P2POp(dist.irecv, from_prev, prev_peer, group))
        if rank < size - 1:
            next_peer = dist.get_global_rank(group, rank + 1)
            ops.append(dist.P2POp(dist.irecv, from_next, next_peer, group))
            ops.append(dist.P2POp(dist.isend, to_next.contiguous(), next_peer, group))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        return from_next, from_prev


DIST_COMM = TorchDistComm()
install_group_comm(DIST_COMM)
