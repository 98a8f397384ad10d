"""Tensor parallel over several steps, initialisation and checkpoint resharding (gloo).

Optimizers step on the local shards; after each step the losses and MTP losses, and at the end
the gathered parameters, equal the single-process run's. Adam runs with `add_bias_linear: false`
and no QKV bias (a key bias has an exactly-zero gradient on one device that TP turns into rounding
noise, which Adam then normalises into steps of size lr), the default init std 0.02 and eps 1e-6:
Adam divides each gradient element by its own size, so elements that happen to be tiny turn the
~1e-7 relative rounding differences of TP's reordered sums into visible steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mtp_cli import UserError, build_model, load_spec
from mtp_cli.builders.init import initialize_parameters
from mtp_cli.parallel.tensor_parallel import (
    gather_state_dict,
    parallelize_tensor,
    shard_state_dict,
)
from mtp_cli.parallel.tp_grads import sync_sequence_parallel_grads
from mtp_cli.plan.stages import Stage
from mtp_cli.train.step import StepLayout, clip_gradients
from tests.dist_utils import run_distributed
from tests.tp_cases import (
    assert_close,
    assert_trackers_equal,
    forward_backward,
    make_batch,
    make_spec,
    reference_and_parallel,
)

pytestmark = pytest.mark.distributed
STEPS = 3
MAX_NORM = 0.5  # small enough that clipping is active in every step


def _optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)
    # eps 1e-6, not 1e-8: Adam's step g/(|g|+eps) turns the ~1e-9 rounding differences of an
    # element whose gradient happens to be ~1e-8 into 1e-4 parameter differences.
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)


def _train_case(arch: str, depths: int, tied: bool, sp: bool, optimizer: str,
                overrides: dict) -> None:
    label = f"{arch} D={depths} tied={tied} sp={sp} {optimizer}"
    spec = make_spec(arch, depths, tied, **overrides)
    reference, parallel, _ = reference_and_parallel(spec, dist.group.WORLD, sp)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    ref_opt = _optimizer(optimizer, reference.parameters())
    tp_opt = _optimizer(optimizer, parallel.parameters())
    for step in range(STEPS):
        batch = make_batch(seed=100 + step)
        ref_opt.zero_grad()
        tp_opt.zero_grad()
        expected_loss, expected_tracker = forward_backward(reference, batch)
        loss, tracker = forward_backward(parallel, batch)
        assert_close(loss, expected_loss, f"{label} step {step}")
        assert_trackers_equal(tracker, expected_tracker, f"{label} step {step}")
        sync_sequence_parallel_grads(parallel)
        expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
        norm = torch.tensor(clip_gradients([parallel], MAX_NORM, StepLayout(),
                                            torch.device("cpu")))
        assert expected_norm > MAX_NORM, label
        assert_close(norm, expected_norm, label)
        ref_opt.step()
        tp_opt.step()
    final, expected = gather_state_dict(parallel), reference.state_dict()
    for name in expected:
        assert_close(final[name], expected[name], f"{label}: {name}")
        assert not torch.equal(expected[name], initial[name]), f"{label}: {name} never moved"


def _train_worker(rank: int, world_size: int, cases: list[tuple]) -> None:
    for case in cases:
        _train_case(*case)


def test_sgd_and_adam_steps_match_single_process():
    """3 clipped steps of SGD (biases everywhere) and Adam (no biases), TP2, with and without SP."""
    no_bias = {"add_bias_linear": False, "add_qkv_bias": False, "init_method_std": 0.02}
    cases = [
        ("gpt", 2, False, False, "sgd", {}),
        ("llama", 1, True, True, "sgd", {}),
        ("gpt", 2, True, True, "adam", no_bias),
        ("llama", 2, False, False, "adam", no_bias),
        ("llama", 2, True, True, "adam", no_bias),
    ]
    run_distributed(_train_worker, 2, cases)


def _init_and_checkpoint_worker(rank: int, world_size: int) -> None:
    group = dist.group.WORLD
    for arch, tied, sp in (("gpt", False, False), ("llama", True, True)):
        spec = make_spec(arch, 2, tied)
        expected = build_model(spec).state_dict()

        # meta build -> shard -> materialise -> initialise each rank's slice by global name
        model = build_model(spec, "meta")
        plan = parallelize_tensor(model, group, sequence_parallel=sp)
        full_shapes = plan.full_shapes(model)
        model.to_empty(device="cpu")
        initialize_parameters(model, spec, shard_fn=plan.shard_like_parameter,
                              full_shapes=full_shapes)
        assert {k: tuple(v.shape) for k, v in expected.items()} == \
            {k: tuple(v) for k, v in full_shapes.items()}
        started = gather_state_dict(model)
        assert all(torch.equal(started[k], expected[k]) for k in expected), arch
        local = model.state_dict()
        sharded = shard_state_dict(model, expected)
        assert all(torch.equal(local[k], sharded[k]) for k in local), arch
        assert any(local[k].shape != expected[k].shape for k in local), arch

        # load another full state dict (as a checkpoint written at any TP size would give)
        other = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
                 for i, (k, v) in enumerate(expected.items())}
        model.load_state_dict(shard_state_dict(model, other))
        reloaded = gather_state_dict(model)
        assert all(torch.equal(reloaded[k], other[k]) for k in other), arch

        # tensors shaped like parameters (Adam's moments) round-trip the same way
        for name, value in other.items():
            local_value = plan.shard_like_parameter(name, value * 3)
            assert torch.equal(plan.gather_like_parameter(name, local_value), value * 3), name
        step = torch.tensor(7.0)
        assert plan.gather_like_parameter("decoder.layers.0.mlp.linear_fc1.weight", step) is step


def _stage_worker(rank: int, world_size: int) -> None:
    for tied in (False, True):
        spec = make_spec("llama", 2, tied)
        expected = build_model(spec).state_dict()
        stages = [  # the last decoder layer, the MTP depths and the loss; the loss stage alone
            Stage(decoder_layers=(2,), embedding=False, mtp_layers=2,
                          mtp_depths_in_loss=2),
            Stage(decoder_layers=(), embedding=False, final_layernorm=False,
                          mtp_depths_in_loss=2),
        ]
        for stage in stages:
            model = build_model(spec, "meta", stage=stage)
            plan = parallelize_tensor(model, dist.group.WORLD)
            full_shapes = plan.full_shapes(model)
            model.to_empty(device="cpu")
            initialize_parameters(model, spec, shard_fn=plan.shard_like_parameter,
                                  full_shapes=full_shapes)
            started = gather_state_dict(model)
            label = f"tied={tied} {stage}"
            assert "decoder.layers.0.mlp.linear_fc1.weight" not in started, label
            for name, value in started.items():
                # a tied loss stage's output layer is a copy of the word embedding
                source = "embedding.word_embeddings.weight" \
                    if tied and name == "output_layer.weight" else name
                assert torch.equal(value, expected[source]), f"{label}: {name}"


def _init_worker(rank: int, world_size: int) -> None:
    _init_and_checkpoint_worker(rank, world_size)
    _stage_worker(rank, world_size)


def test_init_by_global_name_and_state_dict_resharding():
    """A meta-built TP2 model, or pipeline stage (global layer numbers, MTP block), initialised
    through `shard_fn` starts from its slice of the single-process weights; full state dicts
    shard and gather back unchanged."""
    run_distributed(_init_worker, 2)


def _already_parallel_worker(rank: int, world_size: int) -> None:
    model = build_model(make_spec("gpt", 1, False), "meta")
    parallelize_tensor(model, dist.group.WORLD)
    with pytest.raises(ValueError, match="already"):
        parallelize_tensor(model, dist.group.WORLD)


@pytest.mark.parametrize(("overrides", "key", "message"), [
    (["model.num_query_groups=1"], "parallel.tensor", "must divide model.num_query_groups (1)"),
    (["model.ffn_hidden_size=47"], "parallel.tensor", "must divide model.ffn_hidden_size (47)"),
    (["model.vocab_size=15"], "parallel.tensor", "must divide model.vocab_size (15)"),
    (["model.seq_length=7", "parallel.sequence_parallel=true"], "parallel.sequence_parallel",
     "needs seq_length (7) divisible by tensor (2)"),
])
def test_sizes_that_do_not_divide_are_refused_once_at_load(overrides, key, message):
    """The model sizes tensor parallel splits are a rule of the spec, checked when it loads
    (`mtp_cli.plan.rules`), not again when the model is sharded."""
    base = make_spec("gpt", 1, False).model_dump(mode="json")
    with pytest.raises(UserError) as error:
        load_spec(base, ["parallel.tensor=2", *overrides])
    assert [p.key for p in error.value.problems] == [key]
    assert message in error.value.problems[0].message


def test_a_model_is_made_tensor_parallel_once():
    run_distributed(_already_parallel_worker, 2)
