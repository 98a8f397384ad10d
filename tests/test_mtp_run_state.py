"""Per-run MTP state: two models in one process keep their own trackers and loss scales, and the
Megatron names act on the current run's state."""

from __future__ import annotations

import torch

from mtp_cli import build_model, load_spec
from mtp_cli.mtp import MTPLossAutoScaler, MTPLossLoggingHelper, MTPRunState
from mtp_cli.mtp.run_state import PROCESS_RUN_STATE, current_run_state

SEQ, VOCAB = 8, 24


def make_model(seed: int):
    spec = load_spec({"model": {"vocab_size": VOCAB, "hidden_size": 16, "num_layers": 1,
                                "num_attention_heads": 2, "seq_length": SEQ},
                      "mtp": {"num_layers": 2, "loss_scaling_factor": 0.5},
                      "train": {"seed": seed}})
    return build_model(spec)


def make_batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=gen)
    mask = (torch.rand(2, SEQ, generator=gen) > 0.2).float()
    return tokens[:, :-1], tokens[:, 1:], mask


def forward(model, batch):
    ids, labels, mask = batch
    per_token = model(ids, labels=labels, loss_mask=mask)
    return (per_token * mask).sum() / mask.sum()


def alone(seed: int, scale: float):
    """The model run by itself with a fresh state: the reference for the interleaved run."""
    model, state = make_model(seed), MTPRunState()
    model.mtp_state = state
    with state.activate():
        MTPLossAutoScaler.set_loss_scale(scale)
    forward(model, make_batch(seed)).backward()
    return {n: p.grad for n, p in model.named_parameters()}, state.tracker


def test_two_models_interleaved_keep_separate_trackers_and_loss_scales():
    a, b = make_model(1), make_model(2)
    a.mtp_state, b.mtp_state = MTPRunState(), MTPRunState()
    loss_a = forward(a, make_batch(1))
    loss_b = forward(b, make_batch(2))
    # Megatron's order: the scale is set after the forward, on the current run's state
    with a.mtp_state.activate():
        MTPLossAutoScaler.set_loss_scale(0.25)
    with b.mtp_state.activate():
        MTPLossAutoScaler.set_loss_scale(4.0)
    loss_b.backward()
    loss_a.backward()
    for model, seed, scale in ((a, 1, 0.25), (b, 2, 4.0)):
        grads, tracker = alone(seed, scale)
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, grads[name], atol=1e-7, rtol=0, msg=name)
        for key in ("values", "count", "correct", "total"):
            assert torch.equal(model.mtp_state.tracker[key], tracker[key]), key
    assert a.mtp_state.loss_scale == 0.25 and b.mtp_state.loss_scale == 4.0
    assert not torch.equal(a.mtp_state.tracker["values"], b.mtp_state.tracker["values"])
    assert PROCESS_RUN_STATE.tracker == {} and PROCESS_RUN_STATE.loss_scale == 1.0


def test_the_scale_matters_so_the_isolation_check_can_fail():
    """Mixing up the two runs' scales would change the MTP weights' gradients."""
    quarter, _ = alone(1, 0.25)
    four, _ = alone(1, 4.0)
    torch.testing.assert_close(quarter["mtp.layers.0.eh_proj.weight"] * 16,
                               four["mtp.layers.0.eh_proj.weight"], rtol=1e-5, atol=1e-8)


def test_megatron_names_act_on_the_current_run():
    a, b = MTPRunState(), MTPRunState()
    with a.activate():
        assert current_run_state() is a
        MTPLossLoggingHelper.save_loss_to_tracker(torch.tensor(3.0), 0, 1)
        MTPLossLoggingHelper.save_acceptance_to_tracker(torch.tensor(1.0), torch.tensor(4.0),
                                                        0, 1)
        MTPLossAutoScaler.set_loss_scale(0.5)
        assert MTPLossLoggingHelper.tracker is a.tracker
        assert MTPLossAutoScaler.main_loss_backward_scale == 0.5
        with b.activate():
            MTPLossLoggingHelper.save_loss_to_tracker(torch.tensor(7.0), 0, 1)
            MTPLossLoggingHelper.save_acceptance_to_tracker(torch.tensor(2.0), torch.tensor(4.0),
                                                            0, 1)
            metrics_b = MTPLossLoggingHelper.track_mtp_metrics(1)
        assert current_run_state() is a
        metrics_a = MTPLossLoggingHelper.track_mtp_metrics(1)
    assert current_run_state() is PROCESS_RUN_STATE
    assert metrics_a["mtp_1 loss"] == 3.0 and metrics_b["mtp_1 loss"] == 7.0
    assert metrics_a["mtp_1_cumulative_acceptance_rate"] == 25.0
    assert metrics_b["mtp_1_cumulative_acceptance_rate"] == 50.0
    assert a.cumulative["correct"].tolist() == [1.0] and b.cumulative["correct"].tolist() == [2.0]
    assert b.loss_scale == 1.0 and PROCESS_RUN_STATE.tracker == {}


def test_a_model_without_its_own_state_uses_the_current_run():
    model, run = make_model(3), MTPRunState()
    with run.activate():
        forward(model, make_batch(3))
    assert run.tracker["count"].tolist() == [1.0, 1.0]
    assert PROCESS_RUN_STATE.tracker == {}
    forward(model, make_batch(3))  # outside any run: the process's state, as in Megatron
    assert MTPLossLoggingHelper.tracker["count"].tolist() == [1.0, 1.0]
