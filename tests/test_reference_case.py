"""Megatron-Core 0.19.2's own numbers: weights load, losses and gradients reproduce to 1e-5."""

from __future__ import annotations

import torch

from mtp_cli import build_model, load_spec
from mtp_cli.mtp import MTPLossLoggingHelper
from tests.reference_case import case_spec_mapping, case_summary, load_case


def _model_with_reference_weights():
    case = load_case()
    model = build_model(load_spec(case_spec_mapping()))
    result = model.load_state_dict(case["state_dict"], strict=False)
    return case, model, result


def test_reference_weights_load_with_no_missing_or_unexpected_keys():
    _case, model, result = _model_with_reference_weights()
    assert [k for k in result.missing_keys if not k.endswith("_extra_state")] == []
    assert [k for k in result.unexpected_keys if not k.endswith("_extra_state")] == []
    assert sum(p.numel() for p in model.parameters()) == case_summary()["n_params"]


def test_reference_main_loss_per_token_matches():
    case, model, _ = _model_with_reference_weights()
    per_token = model(case["input_ids"], case["position_ids"], labels=case["labels"],
                      loss_mask=case["loss_mask"])
    torch.testing.assert_close(per_token, case["main_loss_per_token"], atol=1e-5, rtol=0)
    mask = case["loss_mask"]
    masked_mean = float((per_token.detach() * mask).sum() / mask.sum())
    assert abs(masked_mean - case_summary()["main_loss_masked_mean"]) < 1e-5


def test_reference_mtp_losses_counts_and_gradients_match():
    case, model, _ = _model_with_reference_weights()
    mask = case["loss_mask"]
    per_token = model(case["input_ids"], case["position_ids"], labels=case["labels"],
                      loss_mask=mask)
    tracker = MTPLossLoggingHelper.tracker
    torch.testing.assert_close(tracker["values"], case["mtp_loss_per_depth"], atol=1e-5, rtol=0)
    summary = case_summary()
    assert tracker["total"].tolist() == summary["mtp_total_per_depth_tracker"]
    assert tracker["correct"].tolist() == summary["mtp_correct_per_depth_tracker"]
    ((per_token * mask).sum() / mask.sum()).backward()
    params = dict(model.named_parameters())
    for name, expected in case["grads"].items():
        ours = params[name.replace("mtp_model_layer", "transformer_layer")].grad
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0, msg=name)
