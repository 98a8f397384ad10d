"""Megatron-Core 0.19.2's MoE + MTP case: losses, the MTP tracker and every gradient (router
auxiliary loss included) reproduce to 1e-5 from its configuration and weights."""

from __future__ import annotations

import torch

from mtp_cli import build_model, load_spec
from mtp_cli.mtp import MTPLossLoggingHelper
from tests.reference_case_moe import case_spec_mapping, case_summary, load_case


def _run(**model_overrides):
    """Forward and backward of the reference objective; (case, model, per-token main loss)."""
    case = load_case()
    model = build_model(load_spec(case_spec_mapping(**model_overrides)))
    result = model.load_state_dict(case["state_dict"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    MTPLossLoggingHelper.clean_loss_in_tracker()
    mask = case["loss_mask"]
    per_token = model(case["input_ids"], case["position_ids"], labels=case["labels"],
                      loss_mask=mask)
    ((per_token * mask).sum() / mask.sum()).backward()
    return case, model, per_token.detach()


def test_moe_reference_weights_load_by_megatron_names():
    case = load_case()
    model = build_model(load_spec(case_spec_mapping()))
    ours = set(model.state_dict())
    theirs = {k.replace("mtp_model_layer", "transformer_layer") for k in case["state_dict"]}
    assert ours == theirs
    assert "decoder.layers.1.mlp.router.expert_bias" in ours
    assert "decoder.layers.0.mlp.linear_fc1.weight" in ours  # moe_layer_freq [0, 1]
    assert not any(k.startswith("decoder.layers.0.mlp.router") for k in ours)


def test_moe_reference_losses_tracker_and_gradients_match():
    case, model, per_token = _run()
    torch.testing.assert_close(per_token, case["main_loss_per_token"], atol=1e-5, rtol=0)
    summary = case_summary()
    mask = case["loss_mask"]
    assert abs(float((per_token * mask).sum() / mask.sum()) - summary["main_loss"]) < 1e-5
    tracker = MTPLossLoggingHelper.tracker
    torch.testing.assert_close(tracker["values"], case["mtp_loss_per_depth"], atol=1e-5, rtol=0)
    assert tracker["correct"].tolist() == summary["mtp_correct"]
    assert tracker["total"].tolist() == summary["mtp_total"]
    params = dict(model.named_parameters())
    assert {n.replace("mtp_model_layer", "transformer_layer") for n in case["grads"]} \
        == set(params)
    for name, expected in case["grads"].items():
        ours = params[name.replace("mtp_model_layer", "transformer_layer")].grad
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0, msg=name)
    MTPLossLoggingHelper.clean_loss_in_tracker()


def test_the_case_depends_on_the_aux_loss_and_the_expert_bias():
    """Without the seq-aux loss the router gradients differ; with a zero expert bias the
    selection (and the main loss) differs: the match above tests both."""
    case, model, _ = _run(moe_aux_loss_coeff=0.0)
    router = model.decoder.layers["1"].mlp.router.weight.grad
    expected = case["grads"]["decoder.layers.1.mlp.router.weight"]
    assert (router - expected).abs().max() > 1e-4
    unbiased = {k: (torch.zeros_like(v) if k.endswith("expert_bias") else v)
                for k, v in case["state_dict"].items()}
    model = build_model(load_spec(case_spec_mapping()))
    model.load_state_dict(unbiased)
    with torch.no_grad():
        per_token = model(case["input_ids"], case["position_ids"], labels=case["labels"],
                          loss_mask=case["loss_mask"])
    assert (per_token - case["main_loss_per_token"]).abs().max() > 1e-4
    MTPLossLoggingHelper.clean_loss_in_tracker()
