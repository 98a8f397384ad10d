"""Load-balanced ("zigzag") sharding of a batch over the context-parallel group.

Causal attention makes late tokens cost more than early ones, so the sequence is cut into 2*cp
chunks and rank r holds chunk r followed by chunk 2cp-1-r: every rank gets one cheap and one
expensive chunk. Packed batches are sharded document by document (Transformer Engine's THD
layout, which `roll_tensor` and the attention expect): each document is padded to a multiple of
2*cp, cut into 2*cp chunks, and rank r's local sequence is, for each document in turn, its chunk
r then its chunk 2cp-1-r; document i occupies the local slice
`[cu_seqlens_q_padded[i] // cp, cu_seqlens_q_padded[i+1] // cp)`.

Padding: after each document's real tokens come padding positions with input id 0, label 0,
loss mask 0, and positions that continue the document's (real length, real length + 1, ...).
Padding sits after every real token of its document, so causal attention never lets a real token
see it, and its mask is 0, so the MTP rolls (which roll the mask too) never count it: losses are
those of the unpadded batch. `cu_seqlens_q` keeps the real lengths, `cu_seqlens_q_padded` the
padded boundaries (both global: not divided by cp). The padded sequence keeps exactly
`seq_length` positions: when the padded documents do not fit, the document that reaches the end
is cut (its tail and any later documents of the window are dropped from this sample). The
tokens a sample loses therefore depend on the padding multiple: to compare runs with different
cp sizes on identical tokens, pad for the largest (`pad_packed_documents(batch, 2 * max_cp)`,
or `MicroBatchLoader(pad_to_multiple=...)`), which is a valid layout for every smaller cp.
"""

from __future__ import annotations

import itertools

import torch

from mtp_cli.data.batch import Batch, ranges
from mtp_cli.nn.packed import PackedSeqParams
from mtp_cli.plan.zigzag import zigzag_chunks


def _lengths(boundaries: torch.Tensor) -> list[int]:
    return (boundaries[1:] - boundaries[:-1]).tolist()


def pad_packed_documents(batch: Batch, multiple: int) -> Batch:
    """The packed `batch` with every document padded to a multiple of `multiple` positions.

    A batch whose (padded) documents already all divide by `multiple` is returned unchanged.
    """
    params = batch.packed_seq_params
    if params is None or batch.input_ids.shape[0] != 1:
        raise ValueError("pad_packed_documents needs a packed batch of micro-batch size 1")
    length = batch.seq_length
    if length % multiple:  # a spec cannot ask for it (`mtp_cli.plan.rules`)
        raise ValueError(f"a sequence of {length} positions does not divide by {multiple} to "
                         f"pad packed documents")
    boundaries = params.attention_boundaries().to(torch.int64).cpu()
    slots = _lengths(boundaries)
    if all(slot % multiple == 0 for slot in slots):
        return batch
    real = _lengths(params.cu_seqlens_q.to(torch.int64).cpu())
    new_real, new_slots, offset = [], [], 0
    for size in real:
        if offset >= length:
            break  # documents past the end of the window do not fit
        slot = min(-(-size // multiple) * multiple, length - offset)
        new_real.append(min(size, slot))
        new_slots.append(slot)
        offset += slot
    slot_starts = [0, *itertools.accumulate(new_slots)][:-1]
    device = batch.input_ids.device
    source = ranges(boundaries[:len(new_real)].tolist(), new_real).to(device)
    target = ranges(slot_starts, new_real).to(device)

    def scatter(values: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        out = fill.to(device=device, dtype=values.dtype).unsqueeze(0).clone()
        out[0, target] = values[0, source]
        return out

    zeros = torch.zeros(length, dtype=torch.int64)
    return Batch(
        input_ids=scatter(batch.input_ids, zeros),
        labels=scatter(batch.labels, zeros),
        loss_mask=scatter(batch.loss_mask, zeros),
        position_ids=scatter(batch.position_ids, ranges([0] * len(new_slots), new_slots)),
        packed_seq_params=PackedSeqParams.from_lengths(new_real, new_slots),
    )


def zigzag_index(boundaries: list[int] | torch.Tensor, cp_rank: int, cp_size: int
                 ) -> torch.Tensor:
    """Positions rank `cp_rank` holds (`mtp_cli.plan.zigzag`): per segment, chunk r then chunk
    2cp-1-r. `boundaries` are segment boundaries (`[0, s]` for a plain sequence)."""
    chunks = zigzag_chunks(torch.as_tensor(boundaries).tolist(), cp_rank, cp_size)
    return ranges([c.global_start for c in chunks], [c.length for c in chunks])


def shard_for_context_parallel(batch: Batch, cp_rank: int, cp_size: int,
                               pad_to_multiple: int | None = None) -> Batch:
    """Rank `cp_rank`'s zigzag shard of the full-sequence `batch` (see the module docstring).

    Packed batches are first padded (`pad_packed_documents`) to `pad_to_multiple` (default
    2 x cp_size; it must be a multiple of that). `packed_seq_params` stays global.
    """
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside a context-parallel group of {cp_size}")
    multiple = pad_to_multiple or 2 * cp_size
    if multiple % (2 * cp_size) and cp_size > 1:
        raise ValueError(f"pad_to_multiple ({multiple}) must be a multiple of 2 x cp "
                         f"({2 * cp_size})")
    if batch.packed_seq_params is not None and (cp_size > 1 or pad_to_multiple):
        batch = pad_packed_documents(batch, multiple)
    if cp_size == 1:
        return batch
    if batch.seq_length % (2 * cp_size):  # a spec cannot ask for it (`mtp_cli.plan.rules`)
        raise ValueError(f"a sequence of {batch.seq_length} positions does not split into "
                         f"2 x {cp_size} equal chunks")
    params = batch.packed_seq_params
    boundaries = params.attention_boundaries() if params is not None else [0, batch.seq_length]
    index = zigzag_index(boundaries, cp_rank, cp_size).to(batch.input_ids.device)
    return Batch(
        input_ids=batch.input_ids.index_select(1, index),
        labels=batch.labels.index_select(1, index),
        loss_mask=batch.loss_mask.index_select(1, index),
        position_ids=batch.position_ids.index_select(1, index),
        packed_seq_params=params,
    )
