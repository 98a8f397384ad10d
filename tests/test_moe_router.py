"""Router semantics against references written out by hand here: scores, group-limited top-k,
the expert bias (selection only, and its update), normalised and scaled weights, and the
aux / seq-aux / z losses with their gradients against autograd of the written-out formulas."""

from __future__ import annotations

import math

import pytest
import torch

from mtp_cli import load_spec
from mtp_cli.models.moe.router import TopKRouter
from mtp_cli.models.moe.routing import topk_routing
from mtp_cli.models.moe.run_state import (
    clear_moe_metrics,
    moe_layer_metrics,
    set_moe_aux_loss_scale,
    summarize_moe_metrics,
    update_expert_bias,
)

E, H = 8, 6


def _config(**moe):
    model = {"vocab_size": 32, "hidden_size": H, "num_layers": 2, "num_attention_heads": 2,
             "seq_length": 5, "add_bias_linear": False, "num_moe_experts": E, **moe}
    return load_spec({"model": model}).model


def _router(seed=0, **moe) -> TopKRouter:
    router = TopKRouter(_config(**moe), layer_number=1)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, H, generator=torch.Generator().manual_seed(seed)))
    return router


def _hand_route(logits, topk, *, groups=None, group_topk=None, bias=None, scaling=None,
                score="sigmoid", pre_softmax=False):
    """Per token, in plain Python: the chosen experts and their weights."""
    out = []
    for row in logits.tolist():
        if score == "sigmoid":
            scores = [1 / (1 + math.exp(-x)) for x in row]
        elif pre_softmax:
            total = sum(math.exp(x) for x in row)
            scores = [math.exp(x) / total for x in row]
        else:
            scores = list(row)
        select = [s + (bias[i] if bias is not None else 0.0) for i, s in enumerate(scores)]
        allowed = list(range(len(row)))
        if group_topk:
            size = len(row) // groups
            group_rank = sorted(range(groups), key=lambda g: -sum(sorted(
                select[g * size:(g + 1) * size], reverse=True)[:topk // group_topk]))
            allowed = [e for g in group_rank[:group_topk] for e in range(g * size, (g + 1) * size)]
        chosen = sorted(allowed, key=lambda e: -select[e])[:topk]
        if score == "softmax" and not pre_softmax:
            total = sum(math.exp(scores[e]) for e in chosen)
            weights = {e: math.exp(scores[e]) / total for e in chosen}
        else:
            weights = {e: scores[e] for e in chosen}
            if score == "sigmoid" and topk > 1:
                total = sum(weights.values())
                weights = {e: w / total for e, w in weights.items()}
        out.append({e: w * (scaling or 1.0) for e, w in weights.items()})
    return out


def _as_dicts(probs, routing_map):
    return [{e: float(probs[t, e]) for e in range(probs.shape[1]) if routing_map[t, e]}
            for t in range(probs.shape[0])]


def _assert_same(ours, hand):
    for got, want in zip(ours, hand, strict=True):
        assert got.keys() == want.keys()
        for e in want:
            assert abs(got[e] - want[e]) < 1e-6


LOGITS = torch.randn(7, E, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kwargs", [
    {"score": "sigmoid"},
    {"score": "sigmoid", "groups": 4, "group_topk": 2, "scaling": 2.5},
    {"score": "softmax", "pre_softmax": True, "scaling": 1.5},
    {"score": "softmax"},
    {"score": "softmax", "groups": 2, "group_topk": 1},
])
def test_topk_routing_equals_the_hand_reference(kwargs):
    probs, routing_map, _ = topk_routing(
        LOGITS, 4, score_function=kwargs["score"], pre_softmax=kwargs.get("pre_softmax", False),
        num_groups=kwargs.get("groups"), group_topk=kwargs.get("group_topk"),
        scaling_factor=kwargs.get("scaling"))
    assert routing_map.sum(dim=1).tolist() == [4] * LOGITS.shape[0]
    _assert_same(_as_dicts(probs, routing_map), _hand_route(LOGITS, 4, **kwargs))


def test_group_limited_routing_stays_inside_the_chosen_groups():
    probs, routing_map, _ = topk_routing(LOGITS, 4, score_function="sigmoid", num_groups=4,
                                         group_topk=2)
    groups_used = routing_map.view(-1, 4, 2).any(dim=-1).sum(dim=-1)
    assert (groups_used <= 2).all()
    free, _, _ = topk_routing(LOGITS, 4, score_function="sigmoid")
    assert not torch.equal(free, probs)  # the limit changes some token's choice here


def test_expert_bias_chooses_experts_but_never_weighs_them():
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 5.0])  # forces experts 6 and 7
    probs, routing_map, _ = topk_routing(LOGITS, 2, score_function="sigmoid", expert_bias=bias,
                                         scaling_factor=2.5)
    assert routing_map[:, 6:].all() and not routing_map[:, :6].any()
    scores = torch.sigmoid(LOGITS[:, 6:])
    torch.testing.assert_close(probs[:, 6:], 2.5 * scores / scores.sum(-1, keepdim=True))
    _assert_same(_as_dicts(probs, routing_map),
                 _hand_route(LOGITS, 2, bias=bias.tolist(), scaling=2.5))


def test_bias_update_from_token_counts_after_a_step():
    router = _router(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                     moe_router_bias_update_rate=0.01)
    with torch.no_grad():
        router.expert_bias.copy_(torch.linspace(-0.1, 0.1, E))
    start = router.expert_bias.clone()
    hidden = torch.randn(5, 3, H, generator=torch.Generator().manual_seed(1))
    _, routing_map = router(hidden)
    counts = routing_map.sum(dim=0).float()
    assert torch.equal(router.local_tokens_per_expert, counts)
    with torch.no_grad():  # no gradients (validation, recompute): nothing counted
        router(hidden)
    assert torch.equal(router.local_tokens_per_expert, counts)
    update_expert_bias(router)
    mean = counts.sum() / E  # 15 tokens x top-2 over 8 experts
    expected = [b + 0.01 * (1 if c < mean else -1 if c > mean else 0)
                for b, c in zip(start.tolist(), counts.tolist(), strict=True)]
    torch.testing.assert_close(router.expert_bias, torch.tensor(expected))
    assert router.local_tokens_per_expert.abs().sum() == 0
    twice = router.expert_bias.clone()
    update_expert_bias(router, reduce_counts=lambda c: c * 0)  # all-equal counts: no move
    torch.testing.assert_close(router.expert_bias, twice)
    assert not router.expert_bias.requires_grad


def _aux_grad(router, hidden, scale=1.0, per_token=False):
    """The router weight's gradient from its auxiliary losses alone (the output unused)."""
    set_moe_aux_loss_scale(router, scale, per_token=per_token)
    router.weight.grad = None
    probs, _ = router(hidden)
    (probs * 0).sum().backward()
    return router.weight.grad.clone()


def _switch_formula(scores, chosen, topk):
    """E * coeff-free sum_e f_e P_e: f_e share of the k T routed slots, P_e the mean score."""
    tokens = scores.shape[0]
    fraction = chosen.float().sum(0) / (topk * tokens)
    return E * torch.sum(fraction * scores.mean(0))


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_aux_loss_gradient_is_autograd_of_the_switch_formula(score):
    router = _router(moe_router_score_function=score, moe_router_load_balancing_type="aux_loss",
                     moe_aux_loss_coeff=0.1, moe_router_topk=2)
    hidden = torch.randn(5, 3, H, generator=torch.Generator().manual_seed(2))
    grad = _aux_grad(router, hidden, scale=0.5)
    weight = router.weight.detach().clone().requires_grad_(True)
    logits = hidden.reshape(-1, H) @ weight.t()
    scores = torch.softmax(logits, -1) if score == "softmax" else \
        torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(
        1, scores.topk(2, dim=-1).indices, True)
    loss = _switch_formula(scores, chosen, 2)
    (0.5 * 0.1 * loss).backward()
    torch.testing.assert_close(grad, weight.grad, atol=1e-7, rtol=1e-5)
    values = moe_layer_metrics(router)[1]
    assert abs(values["load_balancing_loss"] - float(loss.detach())) < 1e-6
    assert values["tokens_per_expert"].sum() == 15 * 2


def test_seq_aux_loss_is_the_mean_over_sequences_of_the_per_sequence_formula():
    router = _router(moe_router_score_function="sigmoid", moe_router_topk=2,
                     moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.01)
    hidden = torch.randn(5, 3, H, generator=torch.Generator().manual_seed(4))  # s 5, b 3
    grad = _aux_grad(router, hidden)
    weight = router.weight.detach().clone().requires_grad_(True)
    total = 0.0
    for b in range(3):
        logits = hidden[:, b] @ weight.t()
        scores = torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True)
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(
            1, scores.topk(2, dim=-1).indices, True)
        total = total + _switch_formula(scores, chosen, 2) / 3
    (0.01 * total).backward()
    torch.testing.assert_close(grad, weight.grad, atol=1e-8, rtol=1e-5)
    assert abs(moe_layer_metrics(router)[1]["seq_load_balancing_loss"] - float(total.detach())) < 1e-6


def test_z_loss_gradient_and_value():
    router = _router(moe_router_load_balancing_type="none", moe_z_loss_coeff=1e-3)
    hidden = torch.randn(4, 2, H, generator=torch.Generator().manual_seed(5))
    grad = _aux_grad(router, hidden)
    weight = router.weight.detach().clone().requires_grad_(True)
    logits = hidden.reshape(-1, H) @ weight.t()
    z = torch.mean(torch.log(torch.exp(logits).sum(-1)) ** 2)
    (1e-3 * z).backward()
    torch.testing.assert_close(grad, weight.grad, atol=1e-8, rtol=1e-5)
    assert abs(moe_layer_metrics(router)[1]["z_loss"] - float(z.detach())) < 1e-5


def test_per_token_mode_scales_by_tokens_and_repeated_mtp_layers_by_depths():
    base = dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1)
    hidden = torch.randn(5, 2, H, generator=torch.Generator().manual_seed(6))
    router = _router(**base)
    plain = _aux_grad(router, hidden)
    torch.testing.assert_close(_aux_grad(router, hidden, per_token=True), 10 * plain)
    mtp = TopKRouter(_config(**base), layer_number=3)  # past num_layers 2: an MTP layer
    assert mtp.is_mtp_layer
    mtp.load_state_dict(router.state_dict())
    mtp.mtp_repeats = 2
    torch.testing.assert_close(_aux_grad(mtp, hidden), plain / 2)


def test_no_losses_outside_training_or_without_gradients():
    router = _router(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1,
                     moe_z_loss_coeff=0.1)
    hidden = torch.randn(3, 2, H)
    router.eval()
    probs, _ = router(hidden)
    assert probs.grad_fn is not None and moe_layer_metrics(router)[1] == {}
    router.train()
    with torch.no_grad():
        router(hidden)
    assert moe_layer_metrics(router)[1] == {}


def test_logged_values_follow_megatron_averaging():
    per_layer = {2: {"load_balancing_loss": 1.0, "tokens_per_expert": torch.tensor([4., 0.])},
                 3: {"load_balancing_loss": 3.0, "tokens_per_expert": torch.tensor([1., 3.])}}
    summary = summarize_moe_metrics(per_layer, num_moe_layers=4, loss_scale=0.5)
    assert summary == {"load_balancing_loss": (1.0 + 3.0) * 0.5 / 4, "load_imbalance": 2.0}
    router = _router(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1)
    router(torch.randn(3, 2, H))
    clear_moe_metrics(router)
    assert moe_layer_metrics(router)[1] == {}
