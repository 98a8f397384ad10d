"""Gradient accumulation: two micro-batches of 2 samples step exactly like one of 4.

With full loss masks every micro-batch has the same token counts, so Megatron's normalisation
(masked mean per micro-batch, divided by the number of micro-batches; the MTP term scaled by
`MTPLossAutoScaler.set_loss_scale(1/num_microbatches)`) must give the gradient of the whole
batch at once. A wrong MTP scale (say 1 instead of 1/2) doubles the MTP term and breaks this.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mtp_cli import build_model, load_spec
from mtp_cli.mtp import MTPLossAutoScaler
from mtp_cli.train.step import StepSettings, train_step
from tests.step_helpers import OVERRIDES, batch


def settings(num_microbatches: int, per_token: bool) -> StepSettings:
    return StepSettings(num_microbatches=num_microbatches, per_token_loss=per_token, grad_clip=0.0,
                        bf16=False, device=torch.device("cpu"), dp_cp_size=1, dp_cp_group=None)


def step_once(model, batches, num_micro, per_token):
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    out = train_step(model, optimizer, batches, settings(num_micro, per_token))
    return out, dict(model.named_parameters())


@pytest.mark.parametrize("per_token", [False, True])
def test_two_micro_batches_step_like_one_big_batch(per_token):
    spec = load_spec("specs/tiny.yaml", [*OVERRIDES,
                                         f"train.calculate_per_token_loss={str(per_token).lower()}"])
    tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))
    base = build_model(spec)
    split, whole = copy.deepcopy(base), copy.deepcopy(base)
    out_split, params_split = step_once(split, [batch(tokens[:2]), batch(tokens[2:])], 2, per_token)
    out_whole, params_whole = step_once(whole, [batch(tokens)], 1, per_token)
    assert out_split.loss_tokens == out_whole.loss_tokens == 64
    assert out_split.lm_loss == pytest.approx(out_whole.lm_loss, abs=1e-6)
    moved = 0.0
    for name, param in params_whole.items():
        torch.testing.assert_close(params_split[name], param, atol=1e-6, rtol=0, msg=name)
        moved = max(moved, float((param.detach() - dict(base.named_parameters())[name].detach()).abs().max()))
    assert moved > 1e-3  # the step did something


def test_the_mtp_term_reaches_the_gradient():
    """The same step with lambda = 0 moves the MTP layers not at all, with lambda = 1 it does."""
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    moved = {}
    for weight in (0.0, 1.0):
        spec = load_spec("specs/tiny.yaml", [*OVERRIDES[:-1], f"mtp.loss_scaling_factor={weight}"])
        model = build_model(spec)
        before = model.mtp.layers["0"].eh_proj.weight.detach().clone()
        step_once(model, [batch(tokens)], 1, False)
        moved[weight] = float((model.mtp.layers["0"].eh_proj.weight.detach() - before).abs().max())
    assert moved[0.0] == 0.0 and moved[1.0] > 1e-4
    MTPLossAutoScaler.set_loss_scale(1.0)
