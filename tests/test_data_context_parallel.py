"""Context-parallel sharding of batches: zigzag chunks, padded packed documents, CP rolls."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist

from mtp_cli import load_spec
from mtp_cli.data import (
    Batch,
    MicroBatchLoader,
    TokenStream,
    TokenWindows,
    packed_batch,
    pad_packed_documents,
    plain_batch,
    shard_for_context_parallel,
    zigzag_index,
)
from mtp_cli.errors import UserError
from mtp_cli.mtp import roll_tensor
from mtp_cli.parallel.comm import DIST_COMM
from tests.data_helpers import EOD
from tests.dist_utils import run_distributed

FIELDS = ("input_ids", "labels", "loss_mask", "position_ids")


def zigzag_reference(values: list, cp_rank: int, cp_size: int) -> list:
    """Cut `values` into 2*cp equal chunks; rank r holds chunk r then chunk 2cp-1-r."""
    size = len(values) // (2 * cp_size)
    chunks = [values[k * size:(k + 1) * size] for k in range(2 * cp_size)]
    return chunks[cp_rank] + chunks[2 * cp_size - 1 - cp_rank]


def random_packed_window(seed: int, length: int, vocab: int = 50) -> torch.Tensor:
    """A window of `length + 1` tokens with EODs at random places (mixed document lengths)."""
    generator = torch.Generator().manual_seed(seed)
    window = torch.randint(0, vocab, (length + 1,), generator=generator)
    cuts = torch.randint(0, length + 1, (max(length // 6, 1),), generator=generator)
    window[cuts] = EOD
    return window


def padded_reference(batch: Batch, multiple: int) -> dict:
    """Each document padded to a multiple (0 / mask 0 / continuing positions), cut to fit."""
    cu = batch.packed_seq_params.cu_seqlens_q.tolist()
    length = batch.seq_length
    rows = {name: getattr(batch, name)[0].tolist() for name in FIELDS}
    out = {name: [] for name in FIELDS}
    real, slots = [], []
    for start, end in itertools.pairwise(cu):
        used = sum(slots)
        if used >= length:
            break
        slot = min(math.ceil((end - start) / multiple) * multiple, length - used)
        keep = min(end - start, slot)
        for name in ("input_ids", "labels", "loss_mask"):
            out[name] += rows[name][start:start + keep] + [0] * (slot - keep)
        out["position_ids"] += list(range(slot))
        real.append(keep)
        slots.append(slot)
    return {**out, "real": real, "slots": slots}


@pytest.mark.parametrize("cp_size", [2, 4])
def test_plain_shard_is_the_zigzag_chunks_of_the_batch(cp_size):
    windows = torch.arange(2 * 17).reshape(2, 17)
    batch = plain_batch(windows)
    for rank in range(cp_size):
        shard = shard_for_context_parallel(batch, rank, cp_size)
        for name in FIELDS:
            full = getattr(batch, name)
            want = [zigzag_reference(row, rank, cp_size) for row in full.tolist()]
            assert getattr(shard, name).tolist() == want
            assert getattr(shard, name).dtype == full.dtype
        assert shard.packed_seq_params is None


def test_packed_shard_by_hand():
    #        a    b    c   E    d    e   E    f  | g
    window = torch.tensor([97, 98, 99, EOD, 100, 101, EOD, 102, 103])
    batch = packed_batch(window, EOD)  # documents of 4, 3, 1 tokens
    padded = pad_packed_documents(batch, 4)
    # 4 -> 4, 3 -> 4, then no room for the third document.
    assert padded.input_ids.tolist() == [[97, 98, 99, EOD, 100, 101, EOD, 0]]
    assert padded.labels.tolist() == [[98, 99, EOD, 100, 101, EOD, 102, 0]]
    assert padded.loss_mask.tolist() == [[1, 1, 1, 0, 1, 1, 0, 0]]
    assert padded.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert padded.packed_seq_params.cu_seqlens_q.tolist() == [0, 4, 7]
    assert padded.packed_seq_params.cu_seqlens_q_padded.tolist() == [0, 4, 8]
    # Each document's 4 positions form 4 chunks of 1: rank 0 holds chunks 0 and 3.
    rank0, rank1 = (shard_for_context_parallel(batch, r, 2) for r in (0, 1))
    assert rank0.input_ids.tolist() == [[97, EOD, 100, 0]]
    assert rank1.input_ids.tolist() == [[98, 99, 101, EOD]]
    assert rank0.position_ids.tolist() == [[0, 3, 0, 3]]
    assert rank1.loss_mask.tolist() == [[1, 1, 1, 0]]
    assert rank0.packed_seq_params.cu_seqlens_q_padded.tolist() == [0, 4, 8]  # global


@pytest.mark.parametrize("cp_size", [2, 4])
@pytest.mark.parametrize("seed", range(6))
def test_packed_shard_matches_reference_with_mixed_document_lengths(cp_size, seed):
    length = 32
    batch = packed_batch(random_packed_window(seed, length), EOD)
    ref = padded_reference(batch, 2 * cp_size)
    params = shard_for_context_parallel(batch, 0, cp_size).packed_seq_params
    assert (params.cu_seqlens_q.diff().tolist(), params.cu_seqlens_q_padded.diff().tolist()) == (
        ref["real"], ref["slots"])
    bounds = [0, *torch.tensor(ref["slots"]).cumsum(0).tolist()]
    for rank in range(cp_size):
        shard = shard_for_context_parallel(batch, rank, cp_size)
        for name in FIELDS:
            want = []
            for start, end in itertools.pairwise(bounds):
                want += zigzag_reference(ref[name][start:end], rank, cp_size)
            assert getattr(shard, name)[0].tolist() == want, name
    # The padded batch keeps every loss token of the unpadded one that fits, in order.
    kept = sum(ref["real"])
    real_mask = batch.loss_mask[0, :kept].bool()
    padded = pad_packed_documents(batch, 2 * cp_size)
    assert torch.equal(padded.labels[padded.loss_mask.bool()], batch.labels[0, :kept][real_mask])


def test_padding_for_the_largest_cp_is_kept_by_smaller_ones():
    batch = packed_batch(random_packed_window(3, 32), EOD)
    padded = pad_packed_documents(batch, 8)
    assert pad_packed_documents(padded, 4) is padded
    for cp_size in (1, 2, 4):
        shards = [shard_for_context_parallel(padded, r, cp_size) for r in range(cp_size)]
        assert all(torch.equal(s.packed_seq_params.cu_seqlens_q_padded,
                               padded.packed_seq_params.cu_seqlens_q_padded) for s in shards)
        total = sum(s.num_tokens for s in shards)
        assert total == padded.num_tokens


def test_loader_shards_for_context_parallel_and_can_pad_for_a_larger_cp():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (200,), generator=generator)
    tokens[torch.randint(0, 200, (30,), generator=generator)] = EOD
    windows = TokenWindows(TokenStream(tokens, torch.tensor([0, 200]), EOD), 16)
    common = dict(micro_batch_size=1, dp_rank=0, dp_size=1, seed=5)
    full = MicroBatchLoader(windows, packed=True, pad_to_multiple=8, **common).next_batch()
    for cp_size in (2, 4):
        for rank in range(cp_size):
            got = MicroBatchLoader(windows, packed=True, cp_rank=rank, cp_size=cp_size,
                                   pad_to_multiple=8, **common).next_batch()
            want = shard_for_context_parallel(full, rank, cp_size)
            assert all(torch.equal(getattr(got, n), getattr(want, n)) for n in FIELDS)
    plain = MicroBatchLoader(windows, micro_batch_size=2, dp_rank=0, dp_size=1, seed=5)
    sharded = MicroBatchLoader(windows, micro_batch_size=2, dp_rank=0, dp_size=1, seed=5,
                               cp_rank=1, cp_size=2)
    want = shard_for_context_parallel(plain.next_batch(), 1, 2)
    assert torch.equal(sharded.next_batch().input_ids, want.input_ids)


def test_sequence_that_does_not_divide_by_two_cp_is_refused_at_load():
    """The spec's rules refuse such a run when it loads (`mtp_cli.plan.rules`); the sharding
    functions only guard their arguments."""
    model = {"vocab_size": 64, "hidden_size": 8, "num_layers": 1, "num_attention_heads": 2,
             "seq_length": 12}
    with pytest.raises(UserError, match=r"must divide by 2 x context \(8\)") as error:
        load_spec({"model": model, "parallel": {"context": 4}})
    assert error.value.problems[0].key == "parallel.context"
    with pytest.raises(UserError, match="must divide by 8 to pad packed documents") as error:
        load_spec({"model": model, "parallel": {"context": 2},
                   "train": {"micro_batch_size": 1, "global_batch_size": 2},
                   "data": {"packed": True, "pad_documents_to": 8}})
    assert error.value.problems[0].key == "data.pad_documents_to"
    batch = plain_batch(torch.arange(13).reshape(1, 13))  # s = 12
    with pytest.raises(ValueError, match="does not split into 2 x 4 equal chunks"):
        shard_for_context_parallel(batch, 0, 4)
    with pytest.raises(ValueError, match="does not divide by 8"):
        shard_for_context_parallel(packed_batch(torch.arange(13), EOD), 0, 4)


# --- roll_tensor on real context-parallel processes -------------------------------------------

def _batches(cp_size: int) -> list[Batch]:
    plain = plain_batch(torch.randint(0, 50, (2, 17), generator=torch.Generator().manual_seed(1)))
    return [plain] + [pad_packed_documents(packed_batch(random_packed_window(s, 16), EOD),
                                           2 * cp_size) for s in range(4)]


def _roll_worker(rank: int, world_size: int) -> None:
    for batch in _batches(world_size):
        params = batch.packed_seq_params
        shard = shard_for_context_parallel(batch, rank, world_size)
        for name in FIELDS:
            full, local = getattr(batch, name), getattr(shard, name)
            for depth in (1, 2, 3):  # MTP depths roll cumulatively
                full, _ = roll_tensor(full, -1, -1, None, params)
                local, _ = roll_tensor(local, -1, -1, dist.group.WORLD, params, comm=DIST_COMM)
                want = shard_for_context_parallel(
                    Batch(*(full if n == name else getattr(batch, n) for n in FIELDS),
                          packed_seq_params=params), rank, world_size)
                assert torch.equal(local, getattr(want, name)), (name, depth, rank)


@pytest.mark.distributed
def test_cp_roll_of_a_shard_equals_the_shard_of_the_full_roll():
    run_distributed(_roll_worker, 2)


@pytest.mark.parametrize("cp_size", [2, 4])
def test_shard_layout_is_the_one_context_parallel_attention_assumes(cp_size):
    from mtp_cli.parallel.context_parallel import zigzag_positions

    for seed in range(4):
        padded = pad_packed_documents(packed_batch(random_packed_window(seed, 32), EOD),
                                      2 * cp_size)
        params = padded.packed_seq_params
        for rank in range(cp_size):
            local = 32 // cp_size
            assert torch.equal(zigzag_index(params.cu_seqlens_q_padded, rank, cp_size),
                               zigzag_positions(local, rank, cp_size, params))
            assert torch.equal(zigzag_index([0, 32], rank, cp_size),
                               zigzag_positions(local, rank, cp_size))
