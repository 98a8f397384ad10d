"""Token dispatch: the seam between routing and the experts.

`LocalTokenDispatcher` is the single-device dispatcher: it groups the tokens by expert (expert
order, then token order within an expert, like Megatron-Core's `permute`), hands each local
expert its tokens and routing weights, and sums every token's expert outputs back in place
(`combine`). Expert parallel replaces it on the MoE layer (`MoELayer.token_dispatcher`) with one
that exchanges tokens between the ranks of the expert group (all-to-all) in `dispatch` and
`combine`; the experts and the router do not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class DispatchedTokens:
    """What the local experts compute on: tokens grouped by local expert."""

    tokens: torch.Tensor  # [N, h], N = routed (token, expert) pairs for the local experts
    probs: torch.Tensor  # [N] the routing weight of each pair
    tokens_per_expert: list[int]  # per local expert, in `local_expert_indices` order
    handle: Any  # what `combine` needs (local: the source token of each row)


class TokenDispatcher(Protocol):
    def dispatch(self, hidden: torch.Tensor, probs: torch.Tensor,
                 routing_map: torch.Tensor) -> DispatchedTokens: ...

    def combine(self, expert_output: torch.Tensor, dispatched: DispatchedTokens,
                num_tokens: int) -> torch.Tensor: ...


class LocalTokenDispatcher:
    """Every expert on this device: a permutation there and a scatter-add back."""

    def __init__(self, local_expert_indices: list[int]) -> None:
        self.local_expert_indices = list(local_expert_indices)

    def dispatch(self, hidden: torch.Tensor, probs: torch.Tensor,
                 routing_map: torch.Tensor) -> DispatchedTokens:
        """`hidden [T, h]`, `probs [T, E]`, `routing_map [T, E]` -> tokens grouped by expert."""
        local = routing_map[:, self.local_expert_indices].t()  # [E_local, T]
        token_index = local.nonzero(as_tuple=True)[1]  # expert-major, token order inside
        weights = probs[:, self.local_expert_indices].t()[local]
        counts = local.sum(dim=1).tolist()
        return DispatchedTokens(hidden[token_index], weights, counts, token_index)

    def combine(self, expert_output: torch.Tensor, dispatched: DispatchedTokens,
                num_tokens: int) -> torch.Tensor:
        """Sum each token's weighted expert outputs: `[N, h]` -> `[T, h]`."""
        out = expert_output.new_zeros(num_tokens, expert_output.shape[-1])
        return out.index_add(0, dispatched.handle, expert_output)
