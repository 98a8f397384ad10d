"""`mtp.depth_weights`: per-depth loss weights and their schedule by fraction of training
(modded-nanogpt's [1, 0.5, 0.25] -> [1, 0.5] -> [1]; a forward curriculum), against the
gradients worked by hand on a loss that is the hidden state itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtp_cli.config import load_spec
from mtp_cli.errors import SpecError
from mtp_cli.mtp import MTPLossAutoScaler
from mtp_cli.mtp.loss import MTPLossSettings, process_mtp_loss

TINY = Path(__file__).resolve().parents[1] / "specs" / "tiny.yaml"
SCHEDULE = ('mtp.depth_weights=[{until_fraction: 0.34, weights: [1, 0.5, 0.25]}, '
            '{until_fraction: 0.67, weights: [1, 0.5]}, {weights: [1]}]')


def _identity_loss(hidden, labels, mask):
    """Per-token loss = the (1-wide) hidden state itself: d loss / d hidden = 1."""
    return hidden[..., 0].transpose(0, 1), torch.zeros_like(labels)


def _depth_grads(weights, depths: int = 3, seq: int = 4, scale: float = 0.3):
    MTPLossAutoScaler.set_loss_scale(1.0)
    hidden = torch.zeros((1 + depths) * seq, 1, 1, requires_grad=True)
    labels, mask = torch.zeros(1, seq, dtype=torch.long), torch.ones(1, seq)
    settings = MTPLossSettings(num_depths=depths, loss_scaling_factor=scale,
                               depth_weights=weights)
    out = process_mtp_loss(hidden, labels, mask, _identity_loss, settings, training=False)
    out.sum().backward()
    return hidden.grad[:, 0, 0].reshape(1 + depths, seq)


def test_weights_scale_each_depth_as_by_hand():
    """λ = 0.3, D = 3, s = 4: depth k's rows 0..s-k-1 have a target (N_k = 4 - k) and get
    (λ/D) w_k / N_k each: 0.1 x 1/3, 0.1 x 0.5/2, 0.1 x 0.25/1."""
    grads = _depth_grads((1.0, 0.5, 0.25))
    assert grads[0].tolist() == [1.0, 1.0, 1.0, 1.0]  # the main term, untouched
    expected = [[0.1 / 3] * 3 + [0.0], [0.025, 0.025, 0.0, 0.0], [0.025, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(grads[1:], torch.tensor(expected), atol=1e-9, rtol=0)


def test_depths_past_the_weights_get_nothing_and_unset_is_megatron_exactly():
    grads = _depth_grads((1.0,))
    assert grads[2].abs().sum() == 0 and grads[3].abs().sum() == 0
    assert torch.equal(_depth_grads(None), _depth_grads((1.0, 1.0, 1.0)))


def test_schedule_by_fraction_of_training():
    spec = load_spec(TINY, ["mtp.num_layers=3", SCHEDULE])
    at = spec.mtp.depth_weights_at
    assert at(0.0) == (1.0, 0.5, 0.25) and at(0.33) == (1.0, 0.5, 0.25)
    assert at(0.34) == (1.0, 0.5) and at(0.66) == (1.0, 0.5)
    assert at(0.67) == (1.0,) and at(1.0) == (1.0,)
    # the trainer reads it at steps done / train.steps: step 101 of 300 has 100 done
    assert at(100 / 300) == (1.0, 0.5, 0.25) and at(102 / 300) == (1.0, 0.5)
    curriculum = load_spec(TINY, ['mtp.depth_weights=[{until_fraction: 0.5, weights: [1]}, '
                                  '{weights: [1, 1]}]'])
    assert curriculum.mtp.depth_weights_at(0.49) == (1.0,)
    assert curriculum.mtp.depth_weights_at(0.5) == (1.0, 1.0)
    assert load_spec(TINY).mtp.depth_weights_at(0.5) is None
    assert load_spec(TINY, ["mtp.depth_weights=[1, 0.5]"]).mtp.depth_weights_at(0.9) == (1.0, 0.5)


@pytest.mark.parametrize(("override", "message"), [
    ("mtp.depth_weights=[1, 1, 1]", "3 weights for mtp.num_layers = 2"),
    ("mtp.depth_weights=[{until_fraction: 0.5, weights: [1]}]", "no until_fraction"),
    ("mtp.depth_weights=[{until_fraction: 0.5, weights: [1]}, {until_fraction: 0.4, "
     "weights: [1]}, {weights: [1]}]", "must increase"),
])
def test_bad_schedules_name_the_key(override, message):
    with pytest.raises(SpecError, match=message) as info:
        load_spec(TINY, [override])
    assert "depth_weights" in str(info.value)
