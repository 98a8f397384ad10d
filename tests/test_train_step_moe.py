"""The current trainer's step drives the MoE routers: the aux losses get the MTP losses'
backward scale, and every expert bias moves once per optimizer step from that step's counts."""

from __future__ import annotations

import torch

from mtp_cli import build_model, load_spec
from mtp_cli.models.moe.run_state import moe_routers
from mtp_cli.train.optim import build_optimizer
from mtp_cli.train.step import StepSettings, train_step
from tests.step_helpers import MOE_STEP_SPEC, moe_batches


def test_train_step_scales_aux_losses_and_updates_the_expert_bias():
    spec = load_spec(MOE_STEP_SPEC)
    model = build_model(spec)
    optimizer = build_optimizer(model, spec.train)
    settings = StepSettings(num_microbatches=3, per_token_loss=False, grad_clip=0.0, bf16=False,
                            device=torch.device("cpu"), dp_cp_size=1, dp_cp_group=None)
    routers = moe_routers(model)
    assert [r.layer_number for r in routers] == [2, 3]  # decoder layer 2 and the MTP layer
    counts = []
    for router in routers:  # what the step's forwards will count, recorded as they run
        router.register_forward_hook(lambda m, i, out: counts.append((m, out[1].sum(0))))
    train_step(model, optimizer, moe_batches(3), settings)
    for router in routers:
        assert router.aux_loss_scale.value == 1 / 3 and not router.aux_loss_scale.per_token
        step_counts = sum(c for m, c in counts if m is router).float()
        mean = step_counts.sum() / 4
        expected = 0.01 * torch.sign(mean - step_counts)
        torch.testing.assert_close(router.expert_bias, expected)
        assert router.local_tokens_per_expert.abs().sum() == 0  # reset for the next step
    settings.per_token_loss = True
    train_step(model, optimizer, moe_batches(3), settings)
    assert all(r.aux_loss_scale.value == 1.0 and r.aux_loss_scale.per_token for r in routers)
