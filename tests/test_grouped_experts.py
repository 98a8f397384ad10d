"""The routed experts' grouped GEMM path (`torch._grouped_mm` on the experts' stacked weights)
against the per-expert loop: the same outputs and gradients to 1e-6 in fp32, the same state-dict
names, idle experts included, and the loop kept where the grouped kernel cannot run."""

from __future__ import annotations

import copy

import pytest
import torch

from mtp_cli import build_model, load_spec
from mtp_cli.models.moe.experts import SequentialMLP
from mtp_cli.models.moe.grouped_gemm import aligned, grouped_mm_available

pytestmark = pytest.mark.skipif(not grouped_mm_available("cpu", torch.float32),
                                reason="torch._grouped_mm does not run on this CPU build")


def _experts(activation: str = "swiglu", bias: bool = False, hidden: int = 16,
             ffn: int = 8) -> SequentialMLP:
    model = {"vocab_size": 32, "hidden_size": hidden, "num_layers": 1, "num_attention_heads": 2,
             "seq_length": 8, "normalization": "RMSNorm", "activation": activation,
             "position_embedding": "rope", "add_bias_linear": bias, "num_moe_experts": 5,
             "moe_router_topk": 2, "moe_ffn_hidden_size": ffn}
    built = build_model(load_spec({"model": model, "mtp": {"num_layers": 0}}))
    experts = built.decoder.layers["0"].mlp.experts
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # biases start at zero: give them values that can show a mistake
        for param in experts.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return experts


def _run(experts: SequentialMLP, grouped: bool, counts: list[int]):
    """Output and gradients (tokens, routing weights, every parameter) of one path."""
    experts = copy.deepcopy(experts)
    experts.grouped_gemm = grouped
    generator = torch.Generator().manual_seed(2)
    hidden = experts.local_experts["0"].linear_fc1.weight.shape[1]
    tokens = torch.randn(sum(counts), hidden, generator=generator, requires_grad=True)
    probs = torch.rand(sum(counts), generator=generator).requires_grad_()
    out = experts(tokens, counts, probs)
    out.backward(torch.randn(out.shape, generator=generator))
    grads = {name: p.grad for name, p in experts.named_parameters()}
    return out, tokens.grad, probs.grad, grads


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu", True),
                                             ("swiglu", True)])
def test_grouped_experts_equal_the_loop_forward_and_gradients(activation, bias):
    experts = _experts(activation, bias)
    counts = [3, 0, 7, 1, 5]  # an idle expert, a single token, uneven blocks
    loop = _run(experts, False, counts)
    grouped = _run(experts, True, counts)
    torch.testing.assert_close(grouped[0], loop[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(grouped[1], loop[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(grouped[2], loop[2], rtol=0, atol=1e-6)
    assert grouped[3].keys() == loop[3].keys()
    for name, grad in loop[3].items():
        torch.testing.assert_close(grouped[3][name], grad, rtol=0, atol=1e-6, msg=name)
    assert grouped[3]["local_experts.1.linear_fc1.weight"].abs().max() == 0  # idle: zero


def test_grouped_path_is_the_default_where_it_runs_and_keeps_the_state_dict():
    experts = _experts()
    names = list(experts.state_dict())
    assert names[:2] == ["local_experts.0.linear_fc1.weight", "local_experts.0.linear_fc2.weight"]
    assert experts.grouped_gemm is None and experts._grouped_runs(torch.zeros(1, 16))
    _run(experts, None, [2, 2, 2, 2, 2])
    assert list(experts.state_dict()) == names


def test_a_sum_of_the_grouped_output_backpropagates():
    """`out.sum()`'s gradient is a stride-0 expansion, which `_grouped_mm`'s backward refuses."""
    experts = _experts()
    experts.grouped_gemm = True
    tokens = torch.randn(4, 16, requires_grad=True)
    experts(tokens, [1, 1, 1, 1, 0], torch.ones(4)).sum().backward()
    assert tokens.grad is not None and torch.isfinite(tokens.grad).all()


def test_unaligned_sizes_fall_back_to_the_loop():
    """`_grouped_mm` needs 16-byte rows: an expert ffn of 5 in fp32 is not, so the loop runs."""
    assert not aligned(torch.float32, 5) and aligned(torch.float32, 12)
    experts = _experts(hidden=12, ffn=5)
    assert not experts._grouped_runs(torch.zeros(1, 12))
    out, *_ = _run(experts, None, [1, 2, 0, 1, 1])
    assert out.shape == (5, 12)
    with pytest.raises(RuntimeError, match="grouped_gemm=True"):
        _run(experts, True, [1, 2, 0, 1, 1])


def test_grouped_experts_under_bf16_autocast_match_the_loop():
    """The bf16 compute dtype of autocast: inputs and weights cast as F.linear's autocast does."""
    experts = _experts()
    counts = [4, 2, 0, 3, 7]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loop = _run(experts, False, counts)
        grouped = _run(experts, True, counts)
    assert grouped[0].dtype == loop[0].dtype == torch.bfloat16
    torch.testing.assert_close(grouped[0], loop[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grouped[1], loop[1], rtol=2e-2, atol=2e-2)
