"""`mtp.separate_grad_norm` (Megatron-LM #4116): the MTP parameters' gradients get their own
norm and are clipped to train.grad_clip apart from the rest; checked against norms worked by
hand on gradients set to constants."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mtp_cli import build_model
from mtp_cli.config import load_spec
from mtp_cli.errors import SpecError
from mtp_cli.train.step import StepLayout, clip_gradients, clip_gradients_separately

TINY = Path(__file__).resolve().parents[1] / "specs" / "tiny.yaml"


def _model_with_constant_grads(main: float, mtp: float):
    model = build_model(load_spec(TINY, ["mtp.separate_grad_norm=true"]))
    counts = {"main": 0, "mtp": 0}
    for name, param in model.named_parameters():
        group = "mtp" if name.startswith("mtp.") else "main"
        param.grad = torch.full_like(param, mtp if group == "mtp" else main)
        counts[group] += param.numel()
    return model, counts


def test_each_group_is_normed_and_clipped_on_its_own():
    model, counts = _model_with_constant_grads(0.01, 0.5)
    assert counts["mtp"] > 0 and counts["main"] > 0
    main_norm, mtp_norm = clip_gradients_separately([model], 1.0, StepLayout(),
                                                    torch.device("cpu"))
    assert main_norm == pytest.approx(0.01 * math.sqrt(counts["main"]), rel=1e-5)
    assert mtp_norm == pytest.approx(0.5 * math.sqrt(counts["mtp"]), rel=1e-5)
    for name, param in model.named_parameters():
        if name.startswith("mtp."):  # clipped to norm 1: 0.5 x 1 / (mtp norm + 1e-6)
            expected = 0.5 / (mtp_norm + 1e-6)
        else:  # the rest: clipped by its own norm, whatever the MTP norm is
            expected = 0.01 * min(1.0, 1.0 / (main_norm + 1e-6))
        torch.testing.assert_close(param.grad, torch.full_like(param, expected), rtol=1e-5,
                                   atol=0, msg=name)


def test_the_two_norms_make_up_the_shared_one():
    model, _ = _model_with_constant_grads(0.01, 0.5)
    other, _ = _model_with_constant_grads(0.01, 0.5)
    main_norm, mtp_norm = clip_gradients_separately([model], 0.0, StepLayout(),
                                                    torch.device("cpu"))
    total = clip_gradients([other], 0.0, StepLayout(), torch.device("cpu"))
    assert total == pytest.approx(math.hypot(main_norm, mtp_norm), rel=1e-6)


def test_not_with_moe():
    with pytest.raises(SpecError, match="separate_grad_norm"):
        load_spec(TINY, ["mtp.separate_grad_norm=true", "model.num_moe_experts=4"])
