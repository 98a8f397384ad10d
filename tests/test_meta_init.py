"""Meta-device construction: parameters meta until this rank's shards are materialised, buffers
real, weights by global name equal to the single-process model's, one full tensor at a time."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.distributed as dist

import mtp_cli.builders.init as init_module
from mtp_cli import build_model
from mtp_cli.parallel.meta_init import materialize, parameters_on_meta
from mtp_cli.parallel.tensor_parallel import parallelize_tensor
from tests.dist_utils import run_distributed
from tests.tp_cases import make_spec


def _build_on_meta(spec):
    with parameters_on_meta():
        return build_model(spec, "cpu", initialize=False)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_parameters_meta_buffers_real_then_the_single_process_weights(arch):
    spec = make_spec(arch, 2, True)
    reference = build_model(spec)
    model = _build_on_meta(spec)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    for name, buffer in reference.named_buffers():  # rotary frequencies computed for real
        assert torch.equal(dict(model.named_buffers())[name], buffer), name
    materialize(model, spec, torch.device("cpu"))
    assert model.state_dict().keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    shared = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert len(shared) - len(list(model.parameters())) == \
        len(list(reference.named_parameters(remove_duplicate=False))) - \
        len(list(reference.parameters()))  # tied weights stay one parameter


def test_frozen_parameters_stay_frozen():
    spec = make_spec("llama", 1, False)
    spec.train.freeze = ["embedding"]
    model = _build_on_meta(spec)
    materialize(model, spec, torch.device("cpu"))
    assert not model.embedding.word_embeddings.weight.requires_grad
    assert model.decoder.layers["0"].mlp.linear_fc1.weight.requires_grad


def _tp_worker(rank: int, world_size: int) -> None:
    spec = make_spec("llama", 2, False)
    reference = build_model(spec)
    model = _build_on_meta(spec)
    plan = parallelize_tensor(model, dist.group.WORLD)
    drawn: list[tuple[str, weakref.ref]] = []
    original = init_module.full_initial_value

    def tracked(name, shape, **kwargs):
        for earlier, ref in drawn:  # every earlier full tensor of a sharded weight is gone
            assert ref() is None or not plan.is_sharded(earlier), (earlier, name)
        value = original(name, shape, **kwargs)
        drawn.append((name, weakref.ref(value)))
        return value

    init_module.full_initial_value = tracked
    try:
        materialize(model, spec, torch.device("cpu"), shard_fn=plan.shard_like_parameter,
                    full_shapes=plan.full_shapes(model))
    finally:
        init_module.full_initial_value = original
    assert len(drawn) == len(list(model.parameters()))
    expected = reference.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, plan.shard_like_parameter(name, expected[name])), name


@pytest.mark.distributed
def test_tp2_materialises_its_shards_of_the_single_process_weights():
    run_distributed(_tp_worker, 2)
