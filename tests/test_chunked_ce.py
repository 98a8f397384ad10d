"""The chunked linear cross-entropy against the plain head (full logits, autograd)."""

from __future__ import annotations

import pytest
import torch

from mtp_cli.models import chunked_ce
from mtp_cli.models.chunked_ce import (
    CHUNKED_AUTO_MIN_LOGITS,
    ChunkedCEOptions,
    chunked_enabled,
    chunked_linear_cross_entropy,
    chunked_token_loss_and_hits,
    grads_in_forward_fits,
)
from mtp_cli.models.output import token_loss_and_hits

TOL = {"rtol": 1e-5, "atol": 1e-5}
SEQ, BATCH, HIDDEN, VOCAB = 23, 2, 16, 97


def make_inputs(seed: int = 0, mask_fraction: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=gen).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5).requires_grad_()
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    mask = (torch.rand(BATCH, SEQ, generator=gen) > mask_fraction).float()
    return hidden, weight, labels, mask


def plain(hidden, weight, labels, mask, upstream):
    loss, hits = token_loss_and_hits(hidden, labels, mask, weight=weight)
    grads = torch.autograd.grad((loss * upstream).sum(), (hidden, weight))
    return loss.detach(), hits, grads


def chunked(hidden, weight, labels, mask, upstream, hint, **options):
    loss, hits = chunked_token_loss_and_hits(
        hidden, labels, mask, weight=weight, options=ChunkedCEOptions(**options))
    if hint is not mask:  # token_loss_fn always hints the mask; exercise other hints directly
        loss, pred = chunked_linear_cross_entropy(hidden, weight, labels, hint,
                                                  ChunkedCEOptions(**options))
        hits = ((pred == labels) & (mask > 0)).sum()
    grads = torch.autograd.grad((loss * upstream).sum(), (hidden, weight))
    return loss.detach(), hits, grads


@pytest.fixture
def recompute_calls(monkeypatch):
    """Counts the backward passes that recomputed the logits (the exact fallback)."""
    calls = []
    original = chunked_ce._recompute_grads

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(chunked_ce, "_recompute_grads", spy)
    return calls


@pytest.mark.parametrize("chunk_tokens", [1, 5, 46, 1000])
@pytest.mark.parametrize("grads_in_forward", [True, False])
def test_loss_gradients_and_hits_equal_plain_head(chunk_tokens, grads_in_forward,
                                                 recompute_calls):
    hidden, weight, labels, mask = make_inputs()
    upstream = mask * 0.37  # a masked mean's gradient: c * mask
    expected = plain(hidden, weight, labels, mask, upstream)
    got = chunked(hidden, weight, labels, mask, upstream, mask, chunk_tokens=chunk_tokens,
                  grads_in_forward=grads_in_forward)
    torch.testing.assert_close(got[0], expected[0], **TOL)
    assert got[1] == expected[1]
    for a, b in zip(got[2], expected[2], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert len(recompute_calls) == (0 if grads_in_forward else 1)


def test_hits_count_argmax_matches_on_the_mask_only():
    hidden, weight, labels, mask = make_inputs(seed=3)
    with torch.no_grad():
        logits = torch.einsum("sbh,vh->bsv", hidden, weight)
    labels = logits.argmax(-1)  # every position guessed right ...
    labels[0, :5] = (labels[0, :5] + 1) % VOCAB  # ... except five
    _, hits = chunked_token_loss_and_hits(hidden, labels, mask, weight=weight,
                                          options=ChunkedCEOptions(chunk_tokens=4))
    right = torch.ones_like(mask, dtype=torch.bool)
    right[0, :5] = False
    assert hits == (right & (mask > 0)).sum()


def test_arbitrary_upstream_gradient_falls_back_to_recomputation(recompute_calls):
    hidden, weight, labels, mask = make_inputs(seed=1)
    upstream = torch.randn(BATCH, SEQ, generator=torch.Generator().manual_seed(7))
    expected = plain(hidden, weight, labels, mask, upstream)
    got = chunked(hidden, weight, labels, mask, upstream, mask, chunk_tokens=4)
    for a, b in zip(got[2], expected[2], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert len(recompute_calls) == 1


def test_all_masked_head_gets_zero_gradients_without_recomputation(recompute_calls):
    hidden, weight, labels, _ = make_inputs(seed=2)
    mask = torch.zeros(BATCH, SEQ)
    got = chunked(hidden, weight, labels, mask, mask * 0.5, mask, chunk_tokens=4)
    expected = plain(hidden, weight, labels, mask, mask * 0.5)
    assert got[1] == 0 == expected[1]
    torch.testing.assert_close(got[0], expected[0], **TOL)
    assert all(not g.any() for g in got[2])
    assert not recompute_calls


def test_ignore_index_labels_get_zero_loss_and_gradient():
    hidden, weight, labels, mask = make_inputs(seed=4)
    labels[1, 3:9] = -100
    ones = torch.ones_like(mask)
    expected = plain(hidden, weight, labels, ones, ones)
    got = chunked(hidden, weight, labels, ones, ones, ones, chunk_tokens=5)
    assert not got[0][1, 3:9].any()
    torch.testing.assert_close(got[0], expected[0], **TOL)
    for a, b in zip(got[2], expected[2], strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_detached_weight_gets_no_gradient_and_input_gradient_is_exact():
    hidden, weight, labels, mask = make_inputs(seed=5)
    loss, _ = chunked_linear_cross_entropy(hidden, weight.detach(), labels, mask,
                                           ChunkedCEOptions(chunk_tokens=6))
    (grad,) = torch.autograd.grad((loss * mask).sum(), hidden)
    expected = plain(hidden, weight, labels, mask, mask)[2][0]
    torch.testing.assert_close(grad, expected, **TOL)


def test_evaluation_without_autograd_matches_and_precomputes_nothing(monkeypatch):
    hidden, weight, labels, mask = make_inputs(seed=6)
    monkeypatch.setattr(chunked_ce._Grads, "zeros", None)  # any gradient buffer would fail
    with torch.no_grad():
        loss, hits = chunked_token_loss_and_hits(hidden, labels, mask, weight=weight,
                                                 options=ChunkedCEOptions(chunk_tokens=7))
        expected, expected_hits = token_loss_and_hits(hidden, labels, mask, weight=weight)
    torch.testing.assert_close(loss, expected, **TOL)
    assert hits == expected_hits


@pytest.mark.parametrize("grads_in_forward", [True, False])
def test_bf16_autocast_keeps_cross_entropy_in_fp32(grads_in_forward):
    hidden, weight, labels, mask = make_inputs(seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked_linear_cross_entropy(hidden, weight, labels, mask, ChunkedCEOptions(
            chunk_tokens=5, grads_in_forward=grads_in_forward))
        expected, _ = token_loss_and_hits(hidden, labels, mask, weight=weight)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad((loss * mask).sum(), (hidden, weight))
    assert [g.dtype for g in grads] == [torch.float32, torch.float32]
    reference = torch.autograd.grad((expected * mask).sum(), (hidden, weight))
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=2e-2)  # bf16 logits both ways
    for a, b in zip(grads, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
    fp32 = plain(hidden, weight, labels, mask, mask)
    assert (loss.detach() - fp32[0]).abs().max() > 0  # the matmul really ran in bf16


def test_auto_threshold_and_forward_gradient_rule():
    assert chunked_enabled(True, 1, 1) and not chunked_enabled(False, 10**6, 10**6)
    assert not chunked_enabled("auto", CHUNKED_AUTO_MIN_LOGITS // 1024, 1024)
    assert chunked_enabled("auto", CHUNKED_AUTO_MIN_LOGITS // 1024 + 1, 1024)
    assert chunked_enabled("auto", 2048, 32000)  # seq 2048, vocab 32k: 65M logits
    assert grads_in_forward_fits(tokens=2048, hidden_size=256, heads=4)
    assert not grads_in_forward_fits(tokens=4096, hidden_size=7168, heads=2)
