"""Non-finite steps, in process: the update is never applied, `stop` and `skip_step` decide
what follows, and metrics.jsonl / meta.json stay valid JSON (null, `"nonfinite": true`)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mtp_cli import build_model, load_spec
from mtp_cli.train.nonfinite import NonFiniteGuard, finite_json
from mtp_cli.train.step import StepSettings, train_step
from mtp_cli.train.stops import NonFiniteStop
from tests.step_helpers import OVERRIDES, batch

SETTINGS = StepSettings(num_microbatches=1, per_token_loss=False, grad_clip=1.0, bf16=False,
                        device=torch.device("cpu"), dp_cp_size=1, dp_cp_group=None)


def _step(model, tokens):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return train_step(model, optimizer, [batch(tokens)], SETTINGS), optimizer


def test_a_non_finite_step_leaves_weights_and_optimizer_untouched():
    model = build_model(load_spec("specs/tiny.yaml", OVERRIDES))
    with torch.no_grad():
        model.decoder.final_layernorm.weight[0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    out, optimizer = _step(model, tokens)
    assert not out.applied and math.isnan(out.lm_loss) and math.isnan(out.grad_norm)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], atol=0, rtol=0, equal_nan=True,
                                   msg=name)
    assert optimizer.state == {}  # no AdamW step taken, no moments from NaN gradients
    assert all(p.grad is None for p in model.parameters())


def test_an_inf_gradient_with_a_finite_loss_is_caught_by_the_norm():
    model = build_model(load_spec("specs/tiny.yaml", OVERRIDES))
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    model.mtp.layers["0"].eh_proj.weight.register_hook(lambda g: g * float("inf"))
    out, _ = _step(model, tokens)
    assert math.isfinite(out.lm_loss) and not math.isfinite(out.grad_norm)
    assert not out.applied


def test_stop_names_the_step_and_the_loss():
    guard = NonFiniteGuard("stop", 5)
    assert guard.check(6, 2.5, 1.0) is False
    with pytest.raises(NonFiniteStop) as raised:
        guard.check(7, float("nan"), float("inf"))
    assert "non-finite loss at step 7: lm_loss nan, grad_norm inf" in raised.value.message
    assert raised.value.agreed  # every rank reaches it: the workers exit 0 and record it


def test_skip_step_skips_at_most_max_skips_in_a_row():
    guard = NonFiniteGuard("skip_step", 2)
    nan = float("nan")
    assert [guard.check(s, nan, nan) for s in (1, 2)] == [True, True]
    assert guard.check(3, 1.0, 1.0) is False  # a finite step resets the count
    assert [guard.check(s, nan, nan) for s in (4, 5)] == [True, True]
    with pytest.raises(NonFiniteStop, match="after 2 skipped steps in a row"):
        guard.check(6, nan, 1.0)


def test_finite_json_nulls_and_flags_nested_values():
    record, found = finite_json({"step": 3, "lm_loss": float("nan"),
                                 "losses": {"mtp_1_loss": float("-inf"), "x": 1.5}})
    assert found and record == {"step": 3, "lm_loss": None,
                                "losses": {"mtp_1_loss": None, "x": 1.5}}
    assert finite_json({"a": 1.0}) == ({"a": 1.0}, False)
