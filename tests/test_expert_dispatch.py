"""The all-to-all token dispatcher of expert parallel against hand references: the regrouping
of received rows, each rank's expert block, the rows every expert receives (listed by hand from
all ranks' tokens and routing), and an MoE layer split over two gloo processes giving each
rank's single-device outputs and, summed over ranks, the single-device gradients; what
`mtp build` quotes per expert-parallel rank is what a rank then holds."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mtp_cli import build_model, load_spec
from mtp_cli.facts.describe import describe_build
from mtp_cli.parallel.expert_dispatch import expert_block, regroup_index
from mtp_cli.parallel.expert_parallel import ExpertParallelGroups, apply_expert_parallel
from tests.dist_utils import run_distributed
from tests.expert_helpers import DISPATCH_SPEC


def test_received_rows_are_regrouped_local_expert_major():
    # from rank 0: 1 row for local expert 0, 2 for expert 1; from rank 1: 3 for expert 0
    counts = torch.tensor([[1, 2], [3, 0]])
    assert regroup_index(counts).tolist() == [0, 3, 4, 5, 1, 2]
    assert regroup_index(torch.zeros(2, 2, dtype=torch.long)).tolist() == []


def test_expert_blocks_are_contiguous_global_indices():
    assert [expert_block(8, 4, r) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert expert_block(8, 1, 0) == list(range(8))


def _tokens(rank: int) -> torch.Tensor:
    return torch.randn(5, 2, 16, generator=torch.Generator().manual_seed(10 + rank))


def _check_dispatch(rank: int, world: int) -> None:
    spec = load_spec(DISPATCH_SPEC)
    reference = build_model(spec).decoder.layers["1"].mlp  # all four experts, one device
    layer = build_model(spec).decoder.layers["1"].mlp
    groups = ExpertParallelGroups(ep_size=world, ep_rank=rank, ep_group=dist.group.WORLD,
                                  edp_group=None, dp_cp_size=world)
    kept = apply_expert_parallel(layer, groups)
    assert sorted({n.split(".")[2] for n in kept}) == [str(2 * rank), str(2 * rank + 1)]

    # the rows each local expert receives, listed by hand from every rank's tokens
    hidden = _tokens(rank).requires_grad_(True)
    flat = hidden.detach().reshape(-1, 16)
    probs, routing_map = layer.router(hidden)
    dispatched = layer.token_dispatcher.dispatch(flat, probs.detach(), routing_map)
    all_tokens = [torch.empty_like(flat) for _ in range(world)]
    all_maps = [torch.empty_like(routing_map) for _ in range(world)]
    dist.all_gather(all_tokens, flat)
    dist.all_gather(all_maps, routing_map)
    expected, counts = [], []
    for expert in expert_block(4, world, rank):
        rows = [tokens[routing[:, expert]] for tokens, routing in zip(all_tokens, all_maps,
                                                                      strict=True)]
        expected += rows
        counts.append(sum(len(r) for r in rows))
    torch.testing.assert_close(dispatched.tokens, torch.cat(expected), rtol=0, atol=0)
    assert dispatched.tokens_per_expert == counts

    # forward and backward through the whole layer against the single-device layer
    out = layer(hidden)
    ref_hidden = _tokens(rank).requires_grad_(True)
    ref_out = reference(ref_hidden)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-6)
    ref_grads = dict(reference.named_parameters())
    for name, param in layer.named_parameters():
        summed = ref_grads[name].grad.clone()
        dist.all_reduce(summed)  # every rank's tokens reach the owner's experts
        if ".local_experts." in name:
            torch.testing.assert_close(param.grad, summed, rtol=1e-4, atol=1e-5)
        else:  # replicated: this rank's tokens only
            torch.testing.assert_close(param.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-5)
    _check_per_rank_count(rank, world)


def _check_per_rank_count(rank: int, world: int) -> None:
    """What `mtp build` quotes per expert-parallel rank is what a rank holds."""
    spec = load_spec({**DISPATCH_SPEC, "mtp": {"num_layers": 1}, "parallel": {"expert": world}})
    model = build_model(spec)
    groups = ExpertParallelGroups(ep_size=world, ep_rank=rank, ep_group=dist.group.WORLD,
                                  edp_group=None, dp_cp_size=world)
    apply_expert_parallel(model, groups)
    held = sum(p.numel() for p in model.parameters())
    (stage,) = describe_build(spec).extra["stages"]
    assert held == stage["parameters_per_expert_rank"] < stage["parameters"]


@pytest.mark.slow  # two spawned processes: ~5 s idle, ~20 s on a loaded 2-core machine
@pytest.mark.distributed
def test_two_rank_dispatch_and_combine_match_one_device():
    run_distributed(_check_dispatch, 2)
