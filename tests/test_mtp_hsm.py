"""`mtp.hsm` (Megatron-LM's mtp_hsm, PR #6566): with a fixed draw the depths' inputs equal the
hand-mixed states; the draw is keyed by (seed, data-parallel rank, step), so a resume draws it
again; evaluation and D < 2 do not mix."""

from __future__ import annotations

import pytest
import torch

from mtp_cli import build_model, load_spec
from mtp_cli.errors import SpecError
from mtp_cli.mtp import block as block_module
from mtp_cli.mtp.hsm import _mix_hidden_state_history
from mtp_cli.mtp.run_state import MTPRunState


def _roll(x: torch.Tensor) -> torch.Tensor:
    """[s, b, h] left by one along s, zero at the end: written independently of roll_tensor."""
    out = torch.zeros_like(x)
    out[:-1] = x[1:]
    return out


def test_mix_takes_the_drawn_candidate_and_the_newest_where_an_older_is_zero():
    older = torch.tensor([[[[1.0, 1.0]], [[2.0, 2.0]], [[0.0, 0.0]]]])  # [1, s=3, b=1, h=2]
    newest = torch.tensor([[[7.0, 7.0]], [[8.0, 8.0]], [[9.0, 9.0]]])
    indices = torch.tensor([0, 1, 0]).view(1, 3, 1, 1)
    mixed = _mix_hidden_state_history(older, newest, indices)
    assert mixed[:, 0].tolist() == [[1.0, 1.0], [8.0, 8.0], [9.0, 9.0]]  # 3rd: zero -> newest


def _model(depths: int = 3, hsm: bool = True):
    spec = load_spec({"model": {"vocab_size": 40, "hidden_size": 16, "num_layers": 1,
                                "num_attention_heads": 2, "seq_length": 6},
                      "mtp": {"num_layers": depths, "hsm": hsm}})
    torch.manual_seed(0)
    return build_model(spec)


def _layer_inputs(model, ids):
    seen = []
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].detach().clone()),
        with_kwargs=True) for layer in model.mtp.layers.values()]
    outputs = []
    hooks += [layer.register_forward_hook(
        lambda module, args, kwargs, out: outputs.append(out[0].detach().clone()),
        with_kwargs=True) for layer in model.mtp.layers.values()]
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    model(ids, positions, labels=ids, loss_mask=torch.ones_like(ids, dtype=torch.float32))
    for hook in hooks:
        hook.remove()
    return seen, outputs


def test_a_fixed_draw_gives_the_hand_mixed_inputs(monkeypatch):
    """Depth 2 takes roll(h0) or h1 as drawn; depth 3 roll(roll(h0)), roll(h1) or h2; an older
    candidate that rolled past the end (all zeros) falls back to the newest."""
    draws = [torch.tensor([0, 1, 0, 1, 0, 0]), torch.tensor([0, 1, 2, 0, 1, 0])]
    monkeypatch.setattr(block_module, "draw_indices",
                        lambda n, newest, generator: draws[n - 2].view(1, -1, 1, 1))
    model = _model().train()
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(1))
    inputs, outputs = _layer_inputs(model, ids)
    h1, h2 = outputs[0], outputs[1]
    h0 = inputs[0]  # depth 1 takes the main model's state unmixed
    r0, rr0, r1 = _roll(h0), _roll(_roll(h0)), _roll(h1)
    expected2 = torch.stack([r0[i] if draws[0][i] == 0 and r0[i].abs().sum() > 0 else h1[i]
                             for i in range(6)])
    candidates = [rr0, r1, h2]
    expected3 = torch.stack([candidates[d][i] if d == 2 or candidates[d][i].abs().sum() > 0
                             else h2[i] for i, d in enumerate(draws[1].tolist())])
    torch.testing.assert_close(inputs[1], expected2, atol=0, rtol=0)
    torch.testing.assert_close(inputs[2], expected3, atol=0, rtol=0)
    assert not torch.equal(inputs[1], h1) and not torch.equal(inputs[2], h2)  # it did mix


def test_the_draw_is_keyed_by_seed_rank_and_step_and_repeats_after_a_resume():
    def draws(key):
        state = MTPRunState(hsm_key=key)
        return [torch.randint(3, (64,), generator=state.hsm_generator(torch.device("cpu")))
                for _ in range(2)]
    first = draws((1234, 0, 7))
    again = draws((1234, 0, 7))  # a resumed run at step 7: a new state, the same key
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])  # the step's 2nd draw differs from its 1st
    for other in ((1234, 1, 7), (1234, 0, 8), (99, 0, 7)):
        assert not torch.equal(draws(other)[0], first[0])


def test_evaluation_does_not_mix():
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(2))
    mixed, plain = _model(hsm=True).eval(), _model(hsm=False).eval()
    positions = torch.arange(6).expand_as(ids)
    with torch.no_grad():
        assert torch.equal(mixed(ids, positions), plain(ids, positions))


def test_hsm_needs_two_depths():
    with pytest.raises(SpecError, match=r"mtp\.hsm needs mtp\.num_layers >= 2"):
        load_spec({"model": {"vocab_size": 40, "hidden_size": 16, "num_layers": 1,
                             "num_attention_heads": 2, "seq_length": 6},
                   "mtp": {"num_layers": 1, "hsm": True}})
