"""MicroBatchLoader: deterministic order, data-parallel sharding, exact resume."""

from __future__ import annotations

import pytest
import torch

from mtp_cli.data import MicroBatchLoader, TokenStream, TokenWindows
from mtp_cli.errors import UserError

SEQ = 4
WINDOWS = 13  # not a multiple of any global batch: global batches straddle epochs


def numbered_windows(count: int = WINDOWS) -> TokenWindows:
    """Windows whose first input token identifies them: window k starts with k * SEQ."""
    tokens = torch.arange(count * SEQ + 1, dtype=torch.int32)
    return TokenWindows(TokenStream(tokens, torch.tensor([0, len(tokens)]), eod=10_000), SEQ)


def window_ids(batch) -> list[int]:
    return (batch.input_ids[:, 0] // SEQ).tolist()


def reference_stream(seed: int, epochs: int, count: int = WINDOWS) -> list[int]:
    """The documented global order: epoch e is randperm(count) seeded with seed + e."""
    order: list[int] = []
    for epoch in range(epochs):
        order += torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch)
                                ).tolist()
    return order


def loaders(dp: int, mbs: int, gbs: int, seed: int = 7, **kwargs) -> list[MicroBatchLoader]:
    return [MicroBatchLoader(numbered_windows(), micro_batch_size=mbs, dp_rank=r, dp_size=dp,
                             seed=seed, global_batch_size=gbs, **kwargs) for r in range(dp)]


@pytest.mark.parametrize("dp, mbs", [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2)])
def test_global_batches_are_the_same_samples_for_any_dp_size(dp, mbs):
    gbs, steps = 8, 5  # 40 samples: three epochs of 13
    expected = reference_stream(7, epochs=4)
    ranks = loaders(dp, mbs, gbs)
    per_step = gbs // (mbs * dp)
    for step in range(steps):
        union: list[int] = []
        for rank, loader in enumerate(ranks):
            mine = [s for _ in range(per_step) for s in window_ids(loader.next_batch())]
            # sample j of the global batch goes to rank j // (gbs / dp), in order
            start = step * gbs + rank * gbs // dp
            assert mine == expected[start:start + gbs // dp]
            union += mine
        assert sorted(union) == sorted(expected[step * gbs:(step + 1) * gbs])


def test_micro_batches_are_the_same_groups_of_samples_for_any_dp_size():
    def groups(dp: int) -> set[tuple[int, ...]]:
        found = set()
        for loader in loaders(dp, 2, 8):
            for _ in range(8 // (2 * dp) * 3):
                found.add(tuple(window_ids(loader.next_batch())))
        return found

    assert groups(1) == groups(2) == groups(4)


def test_every_epoch_visits_each_window_once_in_a_new_order():
    (loader,) = loaders(1, 1, 1, seed=3)
    seen = [window_ids(loader.next_batch())[0] for _ in range(3 * WINDOWS)]
    epochs = [seen[k * WINDOWS:(k + 1) * WINDOWS] for k in range(3)]
    assert all(sorted(epoch) == list(range(WINDOWS)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert seen == reference_stream(3, 3)
    (other_seed,) = loaders(1, 1, 1, seed=4)
    assert [window_ids(other_seed.next_batch())[0] for _ in range(WINDOWS)] != epochs[0]


def test_default_global_batch_interleaves_ranks_one_micro_batch_each():
    ranks = [MicroBatchLoader(numbered_windows(), micro_batch_size=2, dp_rank=r, dp_size=2,
                              seed=7) for r in range(2)]
    expected = reference_stream(7, 2)
    for step in range(4):
        for rank, loader in enumerate(ranks):
            start = (step * 2 + rank) * 2
            assert window_ids(loader.next_batch()) == expected[start:start + 2]


def test_resume_continues_the_uninterrupted_stream_exactly():
    (uninterrupted,) = loaders(2, 1, 4)[1:]
    reference = [uninterrupted.next_batch() for _ in range(17)]
    (first,) = loaders(2, 1, 4)[1:]
    for _ in range(7):
        first.next_batch()
    state = first.state_dict()
    assert all(type(v) is int for v in state.values())
    (resumed,) = loaders(2, 1, 4)[1:]
    resumed.load_state_dict(dict(state))
    for want in reference[7:]:
        got = resumed.next_batch()
        assert torch.equal(got.input_ids, want.input_ids)
        assert torch.equal(got.labels, want.labels)


def test_state_saved_at_a_step_boundary_resumes_under_another_dp_size():
    two = loaders(2, 1, 4)
    for loader in two:
        for _ in range(2 * 3):  # three steps of two micro-batches per rank
            loader.next_batch()
    (one,) = loaders(1, 2, 4)
    one.load_state_dict(two[0].state_dict())
    assert sorted(window_ids(one.next_batch()) + window_ids(one.next_batch())) == sorted(
        [s for loader in two for _ in range(2) for s in window_ids(loader.next_batch())])
    mid_step = loaders(2, 1, 4)[0]
    mid_step.next_batch()
    with pytest.raises(UserError, match="step boundary"):
        loaders(1, 2, 4)[0].load_state_dict(mid_step.state_dict())


def test_validation_stream_is_in_order_and_restarts():
    ranks = loaders(2, 2, 8, shuffle=False)
    first = [window_ids(loader.next_batch()) for loader in ranks for _ in range(2)]
    assert first == [[0, 1], [2, 3], [4, 5], [6, 7]]
    ranks[0].reset()
    assert window_ids(ranks[0].next_batch()) == [0, 1]


def test_bad_layouts_are_rejected():
    with pytest.raises(UserError, match="no window"):
        MicroBatchLoader(numbered_windows(0), micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(UserError, match="multiple"):
        loaders(2, 2, 6)
    with pytest.raises(UserError, match=r"divide by 2 x parallel\.context"):
        MicroBatchLoader(numbered_windows(), micro_batch_size=1, dp_rank=0, dp_size=1, seed=0,
                         cp_size=4)
