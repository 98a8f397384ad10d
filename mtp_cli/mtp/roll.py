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

from mtp_cli.nn.comm import Group, ModelComm, comm_for
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


def roll_tensor(
    tensor: torch.Tensor,
    shifts: int = -1,
    dims: int = -1,
    cp_group: Group = None,
    packed_seq_params: PackedSeqParams | None = None,
    *,
    comm: ModelComm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Roll `tensor` left by one along `dims`; returns `(rolled, rolled.sum())`.

    Examples: `[10,20,30,40,50] -> [20,30,40,50,0]`; packed with `cu_seqlens=[0,3,5]`:
    `[1,2,3,4,5] -> [2,3,0,5,0]`. With `cp_group`, `tensor` is this rank's zigzag shard and the
    result is the matching shard of the rolled global sequence; the sum is the local sum. The
    boundary exchange goes through `comm` (default: `comm_for(cp_group)`).
    """
    if shifts != -1:
        raise ValueError(f"roll_tensor only supports shifts=-1 (the MTP roll), got {shifts}")
    dim = dims % tensor.dim()
    length = tensor.shape[dim]
    comm = comm_for(cp_group, comm)
    cp_size, cp_rank = comm.size(cp_group), comm.rank(cp_group)
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
        # A's firsts go to rank r-1, B's to rank r+1
        from_next, from_prev = comm.exchange_with_neighbours(first_a, first_b, cp_group)
        fill_a = from_next if from_next is not None else first_b  # last rank: its own B
        fill_b = from_prev if from_prev is not None else torch.zeros_like(first_b)
        fill.index_copy_(dim, torch.arange(0, len(starts), 2, device=device), fill_a)
        fill.index_copy_(dim, torch.arange(1, len(starts), 2, device=device), fill_b)
    elif cp_size > 1:
        # keep the exchange symmetric for empty shards
        comm.exchange_with_neighbours(fill.clone(), fill.clone(), cp_group)
    rolled.index_copy_(dim, ends_t, fill)
    return rolled, rolled.sum()


def _roll_tensor_packed_seq(tensor: torch.Tensor, shifts: int, dims: int,
                            packed_seq_params: PackedSeqParams, cp_group: Group = None,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron-Core's packed-sequence roll: each document of `packed_seq_params` rolls on its
    own along the last dimension (with `cp_group`, on this rank's zigzag shard of it).

    Same result as `roll_tensor(tensor, shifts, dims, cp_group, packed_seq_params)`, which it
    calls; kept for code written against the reference's private helper.
    """
    if dims not in (-1, tensor.dim() - 1):
        raise ValueError(f"the packed-sequence roll only supports the last dimension, got {dims}")
    if packed_seq_params is None or packed_seq_params.cu_seqlens_q is None:
        raise ValueError("the packed-sequence roll needs packed_seq_params with cu_seqlens_q")
    return roll_tensor(tensor, shifts, dims, cp_group, packed_seq_params)
