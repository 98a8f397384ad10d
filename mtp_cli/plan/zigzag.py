"""The load-balanced ("zigzag") context-parallel index, in one place.

Causal attention makes late tokens cost more than early ones, so every segment (the whole
sequence, or one packed document padded to a multiple of 2 x cp) is cut into 2 x cp equal
chunks and rank r holds chunk r (A) followed by chunk 2cp-1-r (B). A rank's local sequence is,
for each segment in turn, its A then its B; segment [a, b) occupies the local slice
[a / cp, b / cp). The data loader shards batches with it, attention masks by the global
positions it gives, and the MTP roll finds the ends of the local chunks with it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ZigzagChunk:
    """One chunk a rank holds: where it starts in the global and in the local sequence."""

    global_start: int
    local_start: int
    length: int


def zigzag_chunks(boundaries: Sequence[int], cp_rank: int, cp_size: int) -> list[ZigzagChunk]:
    """Rank `cp_rank`'s chunks in local order: per non-empty segment, its A then its B.

    `boundaries` are global segment boundaries (`[0, s]` for a plain sequence); every segment
    must divide by 2 x cp_size.
    """
    chunks = []
    for index, (start, end) in enumerate(itertools.pairwise(int(b) for b in boundaries)):
        if (end - start) % (2 * cp_size):
            raise ValueError(
                f"segment {index} [{start}, {end}) has length {end - start}, which context "
                f"parallel size {cp_size} cannot split into {2 * cp_size} equal chunks: pad "
                f"documents to a multiple of 2 x cp and pass cu_seqlens_q_padded")
        half = (end - start) // (2 * cp_size)
        if half == 0:
            continue
        local = start // cp_size
        chunks.append(ZigzagChunk(start + cp_rank * half, local, half))
        chunks.append(ZigzagChunk(start + (2 * cp_size - 1 - cp_rank) * half, local + half, half))
    return chunks


def zigzag_positions(boundaries: Sequence[int], cp_rank: int, cp_size: int,
                     local_length: int | None = None) -> list[int]:
    """Global sequence index of each token rank `cp_rank` holds, in local order.

    With `local_length`, local positions past the last segment (beyond the padded documents of a
    packed sequence) get a tail of global positions of their own, past the segments of all ranks.
    """
    positions = [c.global_start + i for c in zigzag_chunks(boundaries, cp_rank, cp_size)
                 for i in range(c.length)]
    if local_length is not None and len(positions) < local_length:
        tail = local_length - len(positions)
        tail_start = int(boundaries[-1]) + cp_rank * tail
        positions += range(tail_start, tail_start + tail)
    return positions
