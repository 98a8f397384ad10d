"""Top-k routing and the router's balancing losses, as pure functions of the logits.

Megatron-Core 0.19's semantics (`moe_utils.py`), all in fp32:
- `topk_routing`: scores from the logits (softmax before or after the top-k, or sigmoid), the
  top-k chosen on `scores + expert_bias` (the bias steers selection only), optionally inside the
  best `group_topk` of `num_groups` expert groups (a group's rank: the sum of its top
  `topk // group_topk` selection scores); sigmoid weights normalised over the chosen k (k > 1);
  weights times `scaling_factor`. Returns dense `[tokens, experts]` probs and a boolean map.
- `scores_for_aux_loss`: the plain scores (softmax, or sigmoid normalised over all experts) and
  their own top-k map, which the load-balancing losses use (not the biased, grouped choice).
- `switch_load_balancing_loss`: `E * coeff / (k * T^2) * sum_e(sum_t score[t, e] * count[e])`.
- `z_loss`: `coeff * mean_t(logsumexp(logits[t])^2)`.
- `updated_expert_bias`: `bias + rate * sign(mean count - count)`.
"""

from __future__ import annotations

import torch


def group_limited_topk(scores: torch.Tensor, topk: int, num_groups: int, group_topk: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of `scores [T, E]` restricted to each token's best `group_topk` groups."""
    tokens, experts = scores.shape
    per_group = scores.view(tokens, num_groups, experts // num_groups)
    group_scores = per_group.topk(topk // group_topk, dim=-1).values.sum(dim=-1)
    chosen_groups = group_scores.topk(group_topk, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores).scatter_(1, chosen_groups, 1.0).bool()
    expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, experts // num_groups).reshape(tokens, -1)
    return scores.masked_fill(~expert_mask, float("-inf")).topk(topk, dim=-1)


def _topk(scores: torch.Tensor, topk: int, num_groups: int | None, group_topk: int | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    if group_topk:
        return group_limited_topk(scores, topk, num_groups, group_topk)
    return scores.topk(topk, dim=1)


def topk_routing(logits: torch.Tensor, topk: int, *, score_function: str = "softmax",
                 pre_softmax: bool = False, num_groups: int | None = None,
                 group_topk: int | None = None, scaling_factor: float | None = None,
                 expert_bias: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`logits [T, E]` -> (probs `[T, E]` zero off the chosen experts, routing map `[T, E]`,
    chosen expert indices `[T, k]` in top-k order)."""
    logits = logits.float()
    if score_function == "softmax":
        if pre_softmax:
            weights, indices = _topk(torch.softmax(logits, dim=-1), topk, num_groups, group_topk)
        else:
            chosen, indices = _topk(logits, topk, num_groups, group_topk)
            weights = torch.softmax(chosen, dim=-1)
    elif score_function == "sigmoid":
        scores = torch.sigmoid(logits)
        if expert_bias is not None:
            _, indices = _topk(scores + expert_bias.float(), topk, num_groups, group_topk)
            weights = scores.gather(1, indices)
        else:
            weights, indices = _topk(scores, topk, num_groups, group_topk)
        if topk > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        raise ValueError(f"unknown score function {score_function!r}")
    if scaling_factor:
        weights = weights * scaling_factor
    probs = torch.zeros_like(logits).scatter(1, indices, weights)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, indices, True)
    return probs, routing_map, indices


def scores_for_aux_loss(logits: torch.Tensor, topk: int, score_function: str
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(routing map of the plain top-k `[T, E]`, scores `[T, E]`) for the balancing losses."""
    logits = logits.float()
    if score_function == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    indices = scores.topk(topk, dim=1).indices
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, indices, True)
    return routing_map, scores


def switch_load_balancing_loss(scores: torch.Tensor, tokens_per_expert: torch.Tensor,
                               total_tokens: int, topk: int, num_experts: int,
                               coeff: float) -> torch.Tensor:
    """Switch Transformer's loss `E * sum_e f_e * P_e` with `f_e = count_e / (k T)` and
    `P_e = mean_t score[t, e]`, times `coeff` (columns of `scores` may be (sequence, expert)
    pairs: then `num_experts` is still E and the loss sums over sequences)."""
    per_expert = scores.sum(dim=0)
    return torch.sum(per_expert * tokens_per_expert) * (
        num_experts * coeff / (topk * total_tokens * total_tokens))


def z_loss(logits: torch.Tensor, coeff: float) -> torch.Tensor:
    """ST-MoE's router z-loss: `coeff * mean(logsumexp(logits)^2)`."""
    return torch.mean(torch.square(torch.logsumexp(logits.float(), dim=-1))) * coeff


def updated_expert_bias(tokens_per_expert: torch.Tensor, expert_bias: torch.Tensor,
                        rate: float) -> torch.Tensor:
    """DeepSeek-V3's auxiliary-loss-free update, per row of `[layers, E]` counts: raise the bias
    of experts that got fewer tokens than the mean, lower it for those that got more."""
    mean = tokens_per_expert.sum(dim=-1, keepdim=True) / tokens_per_expert.shape[-1]
    return expert_bias + torch.sign(mean - tokens_per_expert) * rate
