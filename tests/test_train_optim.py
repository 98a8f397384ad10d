"""AdamW groups and the warmup + cosine schedule, against hand-computed values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mtp_cli import build_model, load_spec
from mtp_cli.config.schema import TrainConfig
from mtp_cli.train.optim import (
    build_optimizer,
    build_scheduler,
    load_scheduler_state,
    lr_at,
    parameter_groups,
    scheduler_state,
)

TRAIN = TrainConfig(steps=12, lr=1.0, min_lr=0.1, warmup_steps=2)


def test_lr_warms_up_linearly_then_follows_the_cosine_to_min_lr():
    assert lr_at(0, TRAIN) == pytest.approx(0.5)  # 1 of 2 warmup steps done
    assert lr_at(1, TRAIN) == pytest.approx(1.0)  # peak at the end of warmup
    # step index 6: 7 done, 5 of 10 decay steps -> cosine at its midpoint
    assert lr_at(6, TRAIN) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(11, TRAIN) == pytest.approx(0.1)  # the last step uses min_lr
    assert lr_at(50, TRAIN) == pytest.approx(0.1)  # past the schedule: stays at min_lr
    rates = [lr_at(i, TRAIN) for i in range(1, 12)]
    assert all(a >= b for a, b in itertools.pairwise(rates))


def test_no_warmup_starts_at_the_peak():
    train = TrainConfig(steps=4, lr=2.0, min_lr=0.0, warmup_steps=0)
    assert lr_at(0, train) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_weight_decay_skips_biases_and_norm_scales_only():
    spec = load_spec("specs/tiny.yaml", ["model.add_bias_linear=true", "model.num_layers=1",
                                         "mtp.num_layers=1"])
    model = build_model(spec)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert "embedding.word_embeddings.weight" in decayed
    assert "mtp.layers.0.eh_proj.weight" in decayed
    assert all(n.endswith(".bias") or "norm" in n or "layernorm" in n for n in undecayed)
    assert any(n.endswith(".bias") for n in undecayed)
    assert "decoder.final_layernorm.weight" in undecayed
    assert decayed | undecayed == set(names.values())
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


def test_scheduler_state_restores_the_learning_rate():
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    train = TrainConfig(steps=12, lr=1.0, min_lr=0.1, warmup_steps=2)
    opt_a = torch.optim.AdamW(params, lr=train.lr)
    sched_a = build_scheduler(opt_a, train)
    for _ in range(5):
        opt_a.step()
        sched_a.step()
    opt_b = torch.optim.AdamW(params, lr=train.lr)
    sched_b = build_scheduler(opt_b, train)
    load_scheduler_state(sched_b, scheduler_state(sched_a))
    assert opt_b.param_groups[0]["lr"] == pytest.approx(lr_at(5, train))
    opt_a.step()
    sched_a.step()
    opt_b.step()
    sched_b.step()
    assert opt_b.param_groups[0]["lr"] == pytest.approx(opt_a.param_groups[0]["lr"])


def test_optimizer_uses_the_spec_hyperparameters():
    spec = load_spec("specs/tiny.yaml", ["train.adam_beta2=0.99", "train.adam_eps=1e-6"])
    optimizer = build_optimizer(build_model(spec), spec.train)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.99) and group["eps"] == 1e-6
    assert group["lr"] == spec.train.lr


def test_decay_steps_defaults_to_steps_and_fixes_the_cosine_when_steps_grow():
    assert TRAIN.decay_steps == 12
    longer = TrainConfig(steps=24, lr=1.0, min_lr=0.1, warmup_steps=2, decay_steps=12)
    assert [lr_at(i, longer) for i in range(12)] == [lr_at(i, TRAIN) for i in range(12)]
    assert lr_at(11, longer) == pytest.approx(0.1) and lr_at(20, longer) == pytest.approx(0.1)
    # without decay_steps the cosine stretches to the new train.steps (what a resume reports)
    stretched = TrainConfig(steps=24, lr=1.0, min_lr=0.1, warmup_steps=2)
    assert lr_at(12, stretched) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
