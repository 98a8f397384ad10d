"""roll_tensor: the reference's examples, and context-parallel shards on real gloo processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mtp_cli.mtp import PackedSeqParams, _roll_tensor_packed_seq, roll_tensor
from tests.cp_cases import zigzag_shard
from tests.dist_utils import run_distributed


def packed(boundaries: list[int], padded: list[int] | None = None) -> PackedSeqParams:
    cu = torch.tensor(boundaries, dtype=torch.int32)
    cu_padded = torch.tensor(padded, dtype=torch.int32) if padded is not None else None
    return PackedSeqParams(cu_seqlens_q=cu, cu_seqlens_q_padded=cu_padded)


def test_plain_roll_zero_fills_the_vacated_slot():
    rolled, total = roll_tensor(torch.tensor([[10, 20, 30, 40, 50]]))
    assert rolled.tolist() == [[20, 30, 40, 50, 0]]
    assert int(total) == 140


def test_repeated_rolls_accumulate():
    once, _ = roll_tensor(torch.tensor([[10, 20, 30, 40, 50]]))
    twice, total = roll_tensor(once)
    assert twice.tolist() == [[30, 40, 50, 0, 0]]
    assert int(total) == 120


def test_roll_along_first_dimension():
    tensor = torch.tensor([[1, 2], [3, 4], [5, 6]])
    rolled, _ = roll_tensor(tensor, dims=0)
    assert rolled.tolist() == [[3, 4], [5, 6], [0, 0]]


def test_packed_roll_respects_boundaries():
    rolled, total = roll_tensor(torch.tensor([1, 2, 3, 4, 5]), packed_seq_params=packed([0, 3, 5]))
    assert rolled.tolist() == [2, 3, 0, 5, 0]
    assert int(total) == 10


def test_packed_roll_keeps_positions_past_the_last_boundary():
    rolled, _ = roll_tensor(torch.tensor([1, 2, 3, 4, 5, 6, 7]),
                            packed_seq_params=packed([0, 3, 5]))
    assert rolled.tolist() == [2, 3, 0, 5, 0, 6, 7]


def test_packed_roll_with_empty_and_one_token_documents():
    rolled, _ = roll_tensor(torch.tensor([[1, 2, 3, 4]]),
                            packed_seq_params=packed([0, 0, 1, 1, 4]))
    assert rolled.tolist() == [[0, 3, 4, 0]]


def test_float_masks_roll_too():
    rolled, total = roll_tensor(torch.tensor([[1.0, 0.0, 1.0, 1.0]]))
    assert rolled.tolist() == [[0.0, 1.0, 1.0, 0.0]]
    assert float(total) == 2.0


def test_other_shifts_are_rejected():
    with pytest.raises(ValueError, match="shifts=-1"):
        roll_tensor(torch.arange(4), shifts=1)


# --- context parallel ---------------------------------------------------------------------------


def _check_cp_roll(rank: int, world: int, sequence: torch.Tensor, boundaries: list[int] | None
                   ) -> None:
    group = dist.new_group(list(range(world)))
    n = sequence.shape[-1]
    spans = boundaries or [0, n]
    params = packed(boundaries) if boundaries else None
    expected_full, _ = roll_tensor(sequence, packed_seq_params=params)
    local = zigzag_shard(sequence, spans, rank, world)
    rolled, total = roll_tensor(local, cp_group=group, packed_seq_params=params)
    expected = zigzag_shard(expected_full, spans, rank, world)
    assert torch.equal(rolled, expected), (rank, rolled, expected)
    assert int(total) == int(expected.sum())
    if params is not None:  # Megatron-Core's packed helper agrees
        packed_rolled, _ = _roll_tensor_packed_seq(local, -1, -1, params, group)
        assert torch.equal(packed_rolled, expected), (rank, packed_rolled, expected)
    # and again: rolls accumulate across ranks as they do unsharded
    twice, _ = roll_tensor(rolled, cp_group=group, packed_seq_params=params)
    expected_twice, _ = roll_tensor(expected_full, packed_seq_params=params)
    assert torch.equal(twice, zigzag_shard(expected_twice, spans, rank, world))


@pytest.mark.distributed
@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_roll_equals_shard_of_unsharded_roll(cp):
    sequence = torch.arange(1, 2 * 8 * cp + 1).reshape(2, 8 * cp)  # [b, s]
    run_distributed(_check_cp_roll, cp, sequence, None)


@pytest.mark.distributed
@pytest.mark.parametrize("cp", [2, 4])
def test_packed_context_parallel_roll_equals_shard_of_unsharded_roll(cp):
    lengths = [2 * cp, 6 * cp, 4 * cp]  # documents padded to multiples of 2 x cp
    boundaries = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    sequence = torch.arange(1, boundaries[-1] + 1)[None, :]
    run_distributed(_check_cp_roll, cp, sequence, boundaries)


def _reference_example(rank: int, world: int) -> None:
    group = dist.new_group([0, 1])
    params = packed([0, 8, 20])
    local = torch.tensor([1, 2, 7, 8, 11, 12, 13, 20, 21, 22]) if rank == 0 else \
        torch.tensor([3, 4, 5, 6, 14, 15, 16, 17, 18, 19])
    rolled, _ = roll_tensor(local, cp_group=group, packed_seq_params=params)
    if rank == 0:
        assert rolled.tolist() == [2, 3, 8, 0, 12, 13, 14, 21, 22, 0]
    else:
        assert rolled.tolist() == [4, 5, 6, 7, 15, 16, 17, 18, 19, 20]


@pytest.mark.distributed
def test_reference_packed_cp2_example():
    run_distributed(_reference_example, 2)


def test_cp_rejects_documents_that_do_not_split():
    with pytest.raises(ValueError, match="cannot split"):
        from mtp_cli.mtp.roll import _segment_starts

        _segment_starts(6, 2, 0, packed([0, 6, 12]))
