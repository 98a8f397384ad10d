"""Expert parallel on the meta device: a rank of an EP group allocates and initialises only its
own routed experts (plus the dense weights), each from the single-process model's initial value
by global name, one full tensor drawn at a time; no other rank's expert is ever drawn or
allocated. Built in this process against torch's fake process group (the real engine, no
collective runs at construction)."""

from __future__ import annotations

import weakref

import pytest
import torch

import mtp_cli.builders.init as init_module
import mtp_cli.parallel.meta_init as meta_init_module
from mtp_cli import build_model, load_spec
from mtp_cli.parallel.expert_dispatch import expert_block
from mtp_cli.parallel.expert_parallel import is_expert_parameter
from tests.cli_helpers import SPECS

SMALL = ["model.num_layers=2", "model.moe_layer_freq=[0, 1]", "model.seq_length=16",
         "train.micro_batch_size=1", "train.global_batch_size=4"]


def _expert_index(name: str) -> int:
    return int(name.split(".local_experts.")[1].split(".")[0])


def _build_rank(spec, world: int, rank: int):
    """The engine of global rank `rank` of `world` under the fake process group, with every
    full initial value drawn and every materialised parameter recorded."""
    from tests.fake_group import fake_rank_engine

    drawn: list[tuple[str, weakref.ref]] = []
    allocated: list[tuple[tuple[int, ...], int]] = []
    draw, empty_like = init_module.full_initial_value, meta_init_module.torch.empty_like

    def tracked_draw(name, shape, **kwargs):
        assert all(ref() is None for _, ref in drawn), name  # one full tensor at a time
        value = draw(name, shape, **kwargs)
        drawn.append((name, weakref.ref(value)))
        return value

    def tracked_empty_like(tensor, **kwargs):
        result = empty_like(tensor, **kwargs)
        allocated.append((tuple(result.shape), result.numel()))
        return result

    init_module.full_initial_value = tracked_draw
    meta_init_module.torch.empty_like = tracked_empty_like
    try:
        with fake_rank_engine(spec, world, rank) as engine:
            pass
    finally:
        init_module.full_initial_value = draw
        meta_init_module.torch.empty_like = empty_like
    return engine, [name for name, _ in drawn], allocated


@pytest.mark.parametrize(("world", "expert", "rank"), [(2, 2, 1), (4, 4, 2)])
def test_a_rank_materialises_only_its_experts_of_the_single_process_weights(world, expert,
                                                                            rank):
    spec = load_spec(SPECS / "tiny_moe.yaml", [*SMALL, f"parallel.expert={expert}"])
    reference = build_model(spec).state_dict()
    engine, drawn, allocated = _build_rank(spec, world, rank)
    mine = set(expert_block(spec.model.num_moe_experts, expert, rank % expert))

    params = dict(engine.chunks[0].named_parameters())
    assert all(p.device.type == "cpu" for p in params.values())
    experts = [n for n in params if is_expert_parameter(n)]
    assert experts and {_expert_index(n) for n in experts} == mine
    # no other rank's expert was drawn or allocated: exactly this rank's parameters were
    assert sorted(drawn) == sorted(params)
    assert sorted(numel for _, numel in allocated) == sorted(p.numel() for p in params.values())
    whole_experts = sum(v.numel() for n, v in reference.items() if is_expert_parameter(n))
    dense = sum(v.numel() for n, v in reference.items()
                if not is_expert_parameter(n) and n in params)
    assert sum(n for _, n in allocated) == dense + whole_experts // expert
    for name, value in params.items():  # the single-process initial weights, by global name
        assert torch.equal(value.detach(), reference[name]), name


@pytest.mark.parametrize(("overrides", "world"), [
    (["parallel.expert=2"], 2),
    (["parallel.expert=2", "parallel.fsdp=true"], 2),  # expert data parallel 1
    (["parallel.expert=2", "parallel.fsdp=true"], 4),  # experts' rows over 2, the rest over 4
])
def test_the_memory_plan_holds_the_engines_expert_shards(overrides, world):
    """`mtp build --memory`'s per-rank parameters are what the engine holds under expert
    parallel, with and without FSDP2 (built against the fake process group)."""
    from mtp_cli.facts.stage_tensors import build_memory_plan
    from tests.fake_group import engine_grad_sync

    spec = load_spec(SPECS / "tiny_moe.yaml", [*SMALL, *overrides])
    plan = build_memory_plan(spec, world, device="cpu")
    _, elements = engine_grad_sync(spec, world, rank=world - 1)
    assert sum(s.parameters for s in plan.ranks[0].stages) == pytest.approx(elements, rel=0.01)
