"""Activation recomputation under tensor parallel (real gloo processes): TP2 with `full` or
`selective` recomputation gives the losses, trackers and every gradient of TP2 without it
(1e-6, dropout on), and - without dropout - of the single-process model (1e-5)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.distributed as dist

from mtp_cli import build_model
from mtp_cli.parallel.recompute import apply_activation_checkpointing
from mtp_cli.parallel.tensor_parallel import parallelize_tensor
from mtp_cli.parallel.tp_grads import sync_sequence_parallel_grads
from tests.dist_utils import run_distributed
from tests.tp_cases import (
    assert_close,
    assert_trackers_equal,
    forward_backward,
    full_grads,
    make_batch,
    make_spec,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
DROPOUT = {"hidden_dropout": 0.1, "attention_dropout": 0.1}


def _tp_step(model, plan, batch, seed: int):
    torch.manual_seed(seed)
    loss, tracker = forward_backward(model, batch)
    sync_sequence_parallel_grads(model)
    return loss, tracker, full_grads(model, plan)


def _check(arch: str, sp: bool, mode: str, dropout: bool) -> None:
    label = f"{arch} sp={sp} {mode} dropout={dropout}"
    spec = make_spec(arch, 2, tied=arch == "llama", **(DROPOUT if dropout else {}))
    reference = build_model(spec)
    plain, recomputed = copy.deepcopy(reference), copy.deepcopy(reference)
    plans = [parallelize_tensor(m, dist.group.WORLD, sequence_parallel=sp)
             for m in (plain, recomputed)]
    apply_activation_checkpointing(recomputed, mode)
    batch = make_batch(seed=5)
    expected = _tp_step(plain, plans[0], batch, seed=11)
    got = _tp_step(recomputed, plans[1], batch, seed=11)
    assert_close(got[0], expected[0], label, atol=1e-6)
    assert_trackers_equal(got[1], expected[1], label)
    assert got[2].keys() == expected[2].keys(), label
    for name, grad in expected[2].items():
        assert_close(got[2][name], grad, f"{label}: grad {name}", atol=1e-6)
    if not dropout:
        single_loss, single_tracker = forward_backward(reference, batch)
        assert_close(got[0], single_loss, f"{label}: vs single process")
        assert_trackers_equal(got[1], single_tracker, f"{label}: vs single process")
        for name, param in reference.named_parameters():
            assert_close(got[2][name], param.grad, f"{label}: vs single process, grad {name}")


def _worker(rank: int, world_size: int) -> None:
    for (arch, mode), sp in zip(itertools.product(("gpt", "llama"), ("full", "selective")),
                                (False, True, True, False), strict=True):
        _check(arch, sp, mode, dropout=True)
    _check("llama", True, "full", dropout=False)
    _check("gpt", False, "selective", dropout=False)


def test_tp2_recomputation_changes_no_loss_or_gradient():
    run_distributed(_worker, 2)
