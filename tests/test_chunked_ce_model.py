"""GPTModel with `train.loss.chunked` against the plain head: losses, every gradient, trackers."""

from __future__ import annotations

import pytest
import torch

from mtp_cli import build_model, load_spec
from mtp_cli.models import chunked_ce
from mtp_cli.mtp import MTPLossAutoScaler, MTPLossLoggingHelper
from tests.cli_helpers import SPECS

TOL = {"rtol": 1e-5, "atol": 1e-5}
SEQ, BATCH = 16, 2


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """5 tokens per chunk at vocab 320, so every head sweeps several chunks."""
    monkeypatch.setattr(chunked_ce, "CHUNK_LOGITS", 320 * 5)


def tiny_model(depths: int, *overrides: str):
    spec = load_spec(SPECS / "tiny.yaml", [f"mtp.num_layers={depths}",
                                           f"model.seq_length={SEQ}", *overrides])
    return build_model(spec)


def batch(seed: int = 0, mask: torch.Tensor | None = None):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 320, (BATCH, SEQ + 1), generator=gen)
    if mask is None:
        mask = (torch.rand(BATCH, SEQ, generator=gen) > 0.25).float()
    return tokens[:, :-1], tokens[:, 1:], mask


def step(model, chunked, inputs, *, per_token=False, upstream=None, labels_given=True):
    """One micro-batch as a trainer runs it: forward, reduce, backward. Returns what it saw."""
    model.loss_settings.chunked = chunked
    model.zero_grad(set_to_none=True)
    MTPLossLoggingHelper.reset()
    input_ids, labels, mask = inputs
    if not labels_given:
        logits = model(input_ids)
        loss = logits.float().square().mean()  # any function of the logits
        per_token_loss = logits.detach()
    else:
        per_token_loss = model(input_ids, labels=labels, loss_mask=mask)
        if upstream is not None:
            loss = (per_token_loss * upstream).sum()
        elif per_token:
            loss = (per_token_loss * mask).sum()
        else:
            loss = (per_token_loss * mask).sum() / mask.sum()
    loss.backward()
    tracker = {k: v.clone() for k, v in MTPLossLoggingHelper.tracker.items()
               if isinstance(v, torch.Tensor)}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return per_token_loss.detach(), grads, tracker


def assert_same(got, expected):
    torch.testing.assert_close(got[0], expected[0], **TOL)
    assert got[1].keys() == expected[1].keys() and got[1]
    for name in expected[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], **TOL, msg=name)
    assert got[2].keys() == expected[2].keys()
    for name in ("correct", "total"):
        if name in expected[2]:
            assert torch.equal(got[2][name], expected[2][name]), name
    if "values" in expected[2]:
        torch.testing.assert_close(got[2]["values"], expected[2]["values"], **TOL)


@pytest.mark.parametrize("depths", [0, 1, 2, 3])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("grads_in_forward", [True, False])
def test_model_losses_gradients_and_acceptance_equal_plain(depths, tied, grads_in_forward,
                                                           monkeypatch):
    model = tiny_model(depths, f"model.share_embeddings_and_output_weights={str(tied).lower()}")
    model.loss_settings.chunked_grads_in_forward = grads_in_forward
    recomputed = []
    original = chunked_ce._recompute_grads
    monkeypatch.setattr(chunked_ce, "_recompute_grads",
                        lambda *a: recomputed.append(1) or original(*a))
    inputs = batch(seed=depths)
    assert_same(step(model, True, inputs), step(model, False, inputs))
    # A masked mean seeds every head with c * mask: forward gradients are used, never redone.
    assert len(recomputed) == (0 if grads_in_forward else 1 + depths)


@pytest.mark.parametrize("grads_in_forward", [True, False])
def test_per_token_loss_mode_equals_plain(grads_in_forward):
    model = tiny_model(3, "train.calculate_per_token_loss=true")
    model.loss_settings.chunked_grads_in_forward = grads_in_forward
    MTPLossAutoScaler.set_loss_scale(torch.tensor(0.5))
    inputs = batch(seed=11)
    assert_same(step(model, True, inputs, per_token=True),
                step(model, False, inputs, per_token=True))


def test_all_masked_depths_equal_plain():
    """Loss only on the first two positions: depths 2 and 3 have no valid target at all."""
    mask = torch.zeros(BATCH, SEQ)
    mask[:, :2] = 1
    model = tiny_model(3)
    model.loss_settings.chunked_grads_in_forward = True
    inputs = batch(seed=12, mask=mask)
    expected = step(model, False, inputs)
    assert expected[2]["total"].tolist() == [2.0, 0.0, 0.0]
    assert_same(step(model, True, inputs), expected)


def test_arbitrary_upstream_gradient_of_main_loss_equals_plain():
    model = tiny_model(2)
    model.loss_settings.chunked_grads_in_forward = True
    inputs = batch(seed=13)
    upstream = torch.randn(BATCH, SEQ, generator=torch.Generator().manual_seed(1))
    assert_same(step(model, True, inputs, upstream=upstream),
                step(model, False, inputs, upstream=upstream))


def test_logits_path_still_trains_mtp_depths_chunked():
    model = tiny_model(2, "model.share_embeddings_and_output_weights=true")
    inputs = batch(seed=14)
    got = step(model, True, inputs, labels_given=False)
    assert_same(got, step(model, False, inputs, labels_given=False))
    assert got[0].shape == (BATCH, SEQ, 320)


def test_detached_heads_equal_plain():
    model = tiny_model(2, "mtp.detach_heads=true")
    model.loss_settings.chunked_grads_in_forward = True
    inputs = batch(seed=15)
    assert_same(step(model, True, inputs), step(model, False, inputs))


def test_auto_chunks_only_large_micro_batches(monkeypatch):
    model = tiny_model(1)
    calls = []
    original = chunked_ce._LinearCrossEntropy.apply
    monkeypatch.setattr(chunked_ce._LinearCrossEntropy, "apply",
                        lambda *a: calls.append(1) or original(*a))
    step(model, "auto", batch())  # 32 tokens x 320 vocab: plain
    assert not calls
    monkeypatch.setattr(chunked_ce, "CHUNKED_AUTO_MIN_LOGITS", BATCH * SEQ * 320 - 1)
    step(model, "auto", batch())
    assert len(calls) == 2  # main head and the one MTP depth


@pytest.mark.parametrize("per_token", [False, True])
def test_trainer_step_equals_plain_and_uses_forward_gradients(per_token, monkeypatch):
    """`mtp_cli.train.step.train_step` (two micro-batches, SGD) moves every parameter as with the
    plain head, and its masked reduction lets every head keep its forward-pass gradients."""
    from mtp_cli.train.step import StepSettings, train_step
    from tests.step_helpers import batch as make_train_batch

    recomputed = []
    original = chunked_ce._recompute_grads
    monkeypatch.setattr(chunked_ce, "_recompute_grads",
                        lambda *a: recomputed.append(1) or original(*a))
    tokens = torch.randint(0, 320, (4, SEQ + 1), generator=torch.Generator().manual_seed(5))
    micro_batches = [make_train_batch(tokens[:2]), make_train_batch(tokens[2:])]
    micro_batches[1].loss_mask[:, ::3] = 0
    settings = StepSettings(num_microbatches=2, per_token_loss=per_token, grad_clip=0.0,
                            bf16=False, device=torch.device("cpu"), dp_cp_size=1,
                            dp_cp_group=None)
    params = {}
    for chunked in (False, True):
        model = tiny_model(2, f"train.calculate_per_token_loss={str(per_token).lower()}",
                           f"train.loss.chunked={str(chunked).lower()}")
        model.loss_settings.chunked_grads_in_forward = True
        train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), micro_batches, settings)
        params[chunked] = dict(model.named_parameters())
    for name, param in params[False].items():
        torch.testing.assert_close(params[True][name], param, **TOL, msg=name)
    assert not recomputed


def test_bf16_autocast_trainer_step_runs_chunked():
    from mtp_cli.train.step import StepSettings, train_step
    from tests.step_helpers import batch as make_train_batch

    tokens = torch.randint(0, 320, (2, SEQ + 1), generator=torch.Generator().manual_seed(6))
    settings = StepSettings(num_microbatches=1, per_token_loss=False, grad_clip=1.0, bf16=True,
                            device=torch.device("cpu"), dp_cp_size=1, dp_cp_group=None)
    losses = []
    for chunked in (False, True):
        model = tiny_model(2, f"train.loss.chunked={str(chunked).lower()}")
        out = train_step(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         [make_train_batch(tokens)], settings)
        assert all(p.isfinite().all() for p in model.parameters())
        losses.append(out.lm_loss)
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)  # bf16 logits either way
