"""The dry run's synthetic expert-parallel routing (`--expert-load uniform | worst`)."""

from __future__ import annotations

import pytest
import torch

from mtp_cli.launch.dry_run import synthetic_expert_counts
from tests.cli_helpers import run_mtp


def test_uniform_counts_share_this_ranks_pairs_equally():
    # EP 2, 3 local experts; this rank routes 10 tokens x top-2 = 20 pairs
    send = torch.tensor([[7, 0, 3], [5, 4, 1]])
    counts = synthetic_expert_counts(send, topk=2, load="uniform")
    assert counts.tolist() == [[4, 4, 3], [3, 3, 3]]  # 20 = 6 x 3 + 2, the 2 to the first
    assert counts.dtype == send.dtype and int(counts.sum()) == 20


@pytest.mark.parametrize(("topk", "local", "per_expert"), [(2, 3, 6), (4, 2, 9)])
def test_worst_counts_route_every_token_of_every_rank_here(topk, local, per_expert):
    tokens = 9
    send = torch.zeros(2, local, dtype=torch.long)
    send[0, 0] = tokens * topk  # what this rank sends does not matter, only how many pairs
    counts = synthetic_expert_counts(send, topk=topk, load="worst")
    # each source's 9 tokens pick min(top-k, local) of our experts: 9 x min / local per expert
    assert counts.tolist() == [[per_expert] * local] * 2


@pytest.mark.slow
def test_a_dry_run_of_an_expert_rank_under_the_worst_load_needs_more_memory():
    peaks = {}
    for load in ("uniform", "worst"):
        result = run_mtp("train", "specs/tiny_moe.yaml", "parallel.expert=2", "--dry-run-rank",
                         "1", "--world-size", "2", "--steps", "1", "--expert-load", load,
                         real_process=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        line = next(x for x in result.stdout.splitlines() if x.startswith("peak memory"))
        peaks[load] = float(line.split("measured ")[1].split(" MiB")[0].replace(",", ""))
    assert peaks["worst"] > peaks["uniform"], peaks


def test_an_unknown_expert_load_exits_2():
    result = run_mtp("train", "specs/tiny_moe.yaml", "parallel.expert=2", "--dry-run-rank", "1",
                     "--world-size", "2", "--expert-load", "heavy", real_process=False)
    assert result.returncode == 2 and "--expert-load" in result.stderr, result.stderr
