"""The attention core without copies or `[s, s]` masks: packed documents run one causal SDPA
call per document and grouped queries go to SDPA as they are; both against the references they
replaced (the dense document mask, K/V repeated per head), forward and gradients, by autograd."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtp_cli import build_model, load_spec
from mtp_cli.models import attention
from mtp_cli.models.attention import (
    DotProductAttention,
    document_spans,
    grouped_kv,
    packed_document_mask,
)
from mtp_cli.nn.packed import PackedSeqParams

TOL = 1e-6
TINY_SPEC = Path(__file__).resolve().parents[1] / "specs" / "tiny.yaml"


def dense_mask_reference(q, k, v, packed_seq_params, sdpa):
    """What the core did before: K/V repeated per head, one call under the `[s, s]` mask."""
    heads = q.shape[1]
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    mask = packed_document_mask(q.shape[2], packed_seq_params, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~mask, scale=None)


def _core_inputs(seq_len: int, heads: int, groups: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape_q, shape_kv = (seq_len, 1, heads, 16), (seq_len, 1, groups, 16)
    return [torch.randn(s, generator=generator, dtype=torch.float64).requires_grad_()
            for s in (shape_q, shape_kv, shape_kv)]


def _forward_backward(core, inputs, params):
    out = core(*inputs, packed_seq_params=params)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    return out.detach(), grads


@pytest.mark.parametrize("lengths", [[37], [20, 17], [1, 9, 3, 12, 1, 7, 4], [5, 1, 31]])
@pytest.mark.parametrize(("heads", "groups"), [(4, 4), (4, 2), (8, 1)])
def test_packed_documents_equal_the_dense_mask(lengths, heads, groups):
    core = DotProductAttention.__new__(DotProductAttention)
    torch.nn.Module.__init__(core)
    core.dropout, core.attn_mask_type, core.softmax_scale = 0.0, "causal", None
    params = PackedSeqParams.from_lengths(lengths)
    inputs = _core_inputs(sum(lengths), heads, groups)
    out, grads = _forward_backward(core, inputs, params)
    q, k, v = (x.detach().permute(1, 2, 0, 3).requires_grad_() for x in inputs)
    ref = dense_mask_reference(q, k, v, params, None).permute(2, 0, 1, 3).reshape_as(out)
    weights = torch.linspace(-1, 1, ref.numel(), dtype=ref.dtype).view_as(ref)
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad.permute(2, 0, 1, 3), atol=TOL, rtol=0)


def test_document_spans_follow_the_padded_boundaries():
    params = PackedSeqParams.from_lengths([3, 1, 2], padded_lengths=[4, 4, 4])
    assert document_spans(12, params) == [(0, 4), (4, 8), (8, 12)]
    assert document_spans(14, params) == [(0, 4), (4, 8), (8, 12), (12, 14)]  # a tail span
    assert document_spans(5, PackedSeqParams.from_lengths([5])) == [(0, 5)]


def test_grouped_queries_are_not_copied_without_gradients(monkeypatch):
    """GQA decoding reaches SDPA with its groups (enable_gqa), never through repeat_interleave
    (a CPU training step repeats them: torch's CPU backward of grouped SDPA is the slow one)."""
    def no_copies(*args, **kwargs):
        raise AssertionError("K/V copied per head")

    monkeypatch.setattr(torch.Tensor, "repeat_interleave", no_copies)
    core = DotProductAttention.__new__(DotProductAttention)
    torch.nn.Module.__init__(core)
    core.dropout, core.softmax_scale = 0.0, None
    query, key, value = _core_inputs(24, 8, 2)
    with torch.no_grad():
        out = core(query, key, value)
    monkeypatch.undo()
    q, k, v = (x.detach().permute(1, 2, 0, 3) for x in (query, key, value))
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, dim=1),
                                         v.repeat_interleave(4, dim=1), is_causal=True)
    torch.testing.assert_close(out.detach(), ref.permute(2, 0, 1, 3).reshape_as(out),
                               atol=TOL, rtol=0)


MLA = ["model.multi_latent_attention=true", "model.num_query_groups=null", "model.q_lora_rank=24", "model.kv_lora_rank=16",
       "model.qk_head_dim=12", "model.qk_pos_emb_head_dim=8", "model.v_head_dim=10"]


@pytest.mark.parametrize("overrides", [
    ["mtp.num_layers=1"], ["mtp.num_layers=3", "model.num_query_groups=1"],
    ["mtp.num_layers=2", *MLA],
], ids=["dense-D1", "gqa-D3", "mla-D2"])
def test_packed_model_equals_the_dense_mask_model(monkeypatch, overrides):
    """The whole model (decoder and every MTP depth) scores a packed batch as the dense-mask
    core did: per-token losses and every parameter's gradient."""
    torch.manual_seed(0)
    model = build_model(load_spec(TINY_SPEC, overrides)).double()
    lengths = [9, 1, 14, 8]
    seq = sum(lengths)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (1, seq), generator=generator)
    labels = torch.randint(0, 256, (1, seq), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    mask = torch.ones(1, seq, dtype=torch.float64)
    params = PackedSeqParams.from_lengths(lengths)

    def losses_and_grads():
        model.zero_grad()
        loss = model(ids, positions, labels=labels, loss_mask=mask, packed_seq_params=params)
        loss.sum().backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss, grads = losses_and_grads()
    monkeypatch.setattr(attention, "packed_causal_attention", dense_mask_reference)
    ref_loss, ref_grads = losses_and_grads()
    torch.testing.assert_close(loss, ref_loss, atol=TOL, rtol=0)
    assert len(grads) == len(ref_grads)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, atol=TOL, rtol=0)


def test_grouped_kv_copies_only_for_a_cpu_step_with_gradients():
    q, k, v = (x.permute(1, 2, 0, 3) for x in _core_inputs(8, 8, 2))
    k_out, v_out, enable_gqa = grouped_kv(q, k, v)
    assert not enable_gqa and k_out.shape[1] == v_out.shape[1] == 8
    assert torch.equal(k_out[:, 4:8], k[:, 1:2].expand(-1, 4, -1, -1))  # head i reads i // 4
    with torch.no_grad():
        k_out, _, enable_gqa = grouped_kv(q, k, v)
    assert enable_gqa and k_out is k
    assert grouped_kv(q, q, q)[2] is False  # one group per head: nothing to group
