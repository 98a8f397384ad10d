"""How one full (canonical, single-process) tensor maps onto tensor-parallel shards.

A `ShardRule` says along which dimension a parameter is split and whether that dimension is a
stack of independent blocks. Plain column-parallel weights split their output rows into `tp`
contiguous blocks; row-parallel weights their input columns. SwiGLU's `linear_fc1` holds
`[gate; up]`: each half is split on its own and rank r holds `[gate_r; up_r]`, so the MLP's local
`chunk(2)` still pairs every gate row with its up row. The fused QKV needs no special rule: its
rows are laid out per query group, so contiguous row blocks are whole groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mtp_cli.parallel.tp_mappings import all_gather_dim, group_rank, group_size


@dataclass(frozen=True)
class ShardRule:
    """Split along `dim`, which is `parts` stacked blocks each split over the TP ranks."""

    dim: int
    parts: int = 1

    def _check(self, length: int, size: int) -> None:
        if length % (self.parts * size):
            raise ValueError(
                f"dimension {self.dim} of length {length} does not split into "
                f"{self.parts} x {size} equal blocks"
            )

    def shard(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        """Rank `rank`'s local tensor (a fresh contiguous copy; works on the meta device)."""
        self._check(full.shape[self.dim], size)
        blocks = [part.chunk(size, dim=self.dim)[rank] for part in full.chunk(self.parts, self.dim)]
        return torch.cat(blocks, dim=self.dim).contiguous()

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's local tensor, in rank order."""
        per_rank = [s.chunk(self.parts, dim=self.dim) for s in shards]
        return torch.cat([blocks[p] for p in range(self.parts) for blocks in per_rank],
                         dim=self.dim)

    def full_shape(self, local_shape: torch.Size, size: int) -> torch.Size:
        shape = list(local_shape)
        shape[self.dim] *= size
        return torch.Size(shape)

    def gather(self, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        """All-gather the shards of `group` into the full tensor (a collective)."""
        size = group_size(group)
        if size == 1:
            return local
        gathered = all_gather_dim(local.detach(), self.dim, group).chunk(size, dim=self.dim)
        return self.unshard(list(gathered))

    def shard_for(self, full: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        return self.shard(full, group_rank(group), group_size(group))

    def local_blocks(self, local_shape: torch.Size, rank: int, size: int
                     ) -> list[tuple[int, int, int]]:
        """Where rank `rank`'s local tensor lies in the full one, block by block.

        Each item is (start in the local tensor, start in the full tensor, length), all along
        `dim`: one block for a plain split, `parts` blocks for a stack (SwiGLU's `[gate_r; up_r]`
        is rows [r*k, (r+1)*k) and [F + r*k, F + (r+1)*k) of the full `[gate; up]`, F = tp*k).
        """
        length = local_shape[self.dim] // self.parts
        stacked = length * size  # one part's length in the full tensor
        return [(p * length, p * stacked + rank * length, length) for p in range(self.parts)]


# Column-parallel: output rows. Row-parallel: input columns. Vocab-parallel: vocabulary rows.
COLUMN = ShardRule(dim=0)
GATED_COLUMN = ShardRule(dim=0, parts=2)
ROW = ShardRule(dim=1)
VOCAB = ShardRule(dim=0)
