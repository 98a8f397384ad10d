"""`roll_tensor`: shift a sequence left by one token, the MTP way.

Each MTP depth sees the sequence one more token ahead, so ids, positions, labels and loss masks are
rolled left by one at every depth; the vacated slot is 0. The roll respects packed-document
boundaries (each document rolls on its own) and context-parallel sharding (the slot vacated at the
end of a rank's chunk is filled from the rank that holds the next chunk of the global sequence).

Context-parallel layout ("zigzag", load-balanced): the global sequence is cut into 2*cp chunks;
rank r holds chunk r (A) followed by chunk 2cp-1-r (B). The element after A's last is the first
of chunk r+1 (rank r+1's A, or this rank's own B on the last rank); the element after B's last is
the first of chunk 2cp-r (rank r-1's B), or the end of the sequence on rank 0.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from mtp_cli.nn.packed import PackedSeqParams
from mtp_cli.plan.zigzag import zigzag_chunks


def _segment_starts(length: int, cp_size: int, cp_rank: int,
                    packed_seq_params: PackedSeqParams | None) -> tuple[list[int], list[int], int]:
    """Local (start, length) of every segment that rolls on its own, and where they end.

    Without context parallel a segment is a document (or the whole sequence); with it, each
    document contributes two half-chunks, A then B (`mtp_cli.plan.zigzag`). Returns (starts,
    lengths, covered_end): positions at or past `covered_end` are not part of any document and
    keep their values.
    """
    if packed_seq_params is None:
        boundaries = [0, length * cp_size]
    else:
        boundaries = [int(b) for b in packed_seq_params.attention_boundaries().tolist()]
    if cp_size == 1:
        starts = [a for a, b in itertools.pairwise(boundaries) if b > a]
        lengths = [b - a for a, b in itertools.pairwise(boundaries) if b > a]
        return starts, lengths, boundaries[-1]
    chunks = zigzag_chunks(boundaries, cp_rank, cp_size)
    return ([c.local_start for c in chunks], [c.length for c in chunks],
            boundaries[-1] // cp_size)


def _exchange_first_elements(
    first_a: torch.Tensor, first_b: torch.Tensor, cp_group: dist.ProcessGroup, cp_rank: int,
    cp_size: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Send A's firsts to rank r-1 and B's firsts to rank r+1; receive theirs."""
    from_next = torch.empty_like(first_a) if cp_rank < cp_size - 1 else None
    from_prev = torch.empty_like(first_b) if cp_rank > 0 else None
    ops = []
    if cp_rank > 0:
        prev_peer = dist.get_global_rank(cp_group, cp_rank - 1)
        ops.append(dist.P2POp(dist.isend, first_a, prev_peer, cp_group))
        ops.append(dist.P2POp(dist.irecv, from_prev, prev_peer, cp_group))
    if cp_rank < cp_size - 1:
        next_peer = dist.get_global_rank(cp_group, cp_rank + 1)
        ops.append(dist.P2POp(dist.irecv, from_next, next_peer, cp_group))
        ops.append(dist.P2POp(dist.isend, first_b, next_peer, cp_group))
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return from_next, from_prev


def roll_tensor(
    tensor: torch.Tensor,
    shifts: int = -1,
    dims: int = -1,
    cp_group: dist.ProcessGroup | None = None,
    packed_seq_params: PackedSeqParams | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Roll `tensor` left by one along `dims`; returns `(rolled, rolled.sum())`.

    Examples: `[10,20,30,40,50] -> [20,30,40,50,0]`; packed with `cu_seqlens=[0,3,5]`:
    `[1,2,3,4,5] -> [2,3,0,5,0]`. With `cp_group`, `tensor` is this rank's zigzag shard and the
    result is the matching shard of the rolled global sequence; the sum is the local sum.
    """
    if shifts != -1:
        raise ValueError(f"roll_tensor only supports shifts=-1 (the MTP roll), got {shifts}")
    dim = dims % tensor.dim()
    length = tensor.shape[dim]
    cp_size = dist.get_world_size(cp_group) if cp_group is not None else 1
    cp_rank = dist.get_rank(cp_group) if cp_group is not None else 0
    if cp_size > 1 and packed_seq_params is None and length % 2:
        raise ValueError(
            f"a context-parallel shard must hold two equal chunks; got local length {length}"
        )
    starts, lengths, covered_end = _segment_starts(length, cp_size, cp_rank, packed_seq_params)
    if covered_end > length:
        raise ValueError(f"packed boundaries end at {covered_end}, past the sequence ({length})")

    device = tensor.device
    source = torch.arange(length, device=device)
    source[:covered_end] += 1  # every covered slot reads its right neighbour ...
    starts_t = torch.tensor(starts, dtype=torch.long, device=device)
    ends_t = starts_t + torch.tensor(lengths, dtype=torch.long, device=device) - 1
    source[ends_t] = ends_t  # ... except a segment's last slot, filled below
    rolled = tensor.index_select(dim, source)

    fill_shape = list(tensor.shape)
    fill_shape[dim] = len(starts)
    fill = torch.zeros(fill_shape, dtype=tensor.dtype, device=device)
    if cp_size > 1 and starts:
        firsts = tensor.index_select(dim, starts_t)  # first element of every half-chunk
        first_a = firsts.index_select(dim, torch.arange(0, len(starts), 2, device=device))
        first_b = firsts.index_select(dim, torch.arange(1, len(starts), 2, device=device))
        from_next, from_prev = _exchange_first_elements(
            first_a.contiguous(), first_b.contiguous(), cp_group, cp_rank, cp_size
        )
        fill_a = from_next if from_next is not None else first_b  # last rank: its own B
        fill_b = from_prev if from_prev is not None else torch.zeros_like(first_b)
        fill.index_copy_(dim, torch.arange(0, len(starts), 2, device=device), fill_a)
        fill.index_copy_(dim, torch.arange(1, len(starts), 2, device=device), fill_b)
    elif cp_size > 1:
        _exchange_first_elements(  # keep the collective symmetric for empty shards
            fill.clone(), fill.clone(), cp_group, cp_rank, cp_size
        )
    rolled.index_copy_(dim, ends_t, fill)
    return rolled, rolled.sum()
