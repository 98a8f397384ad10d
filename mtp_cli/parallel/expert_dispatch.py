"""All-to-all token dispatch for expert parallel (Megatron-Core's `MoEAlltoAllTokenDispatcher`).

An expert-parallel group of P ranks splits the E routed experts into P contiguous blocks of
E / P (rank r holds experts `r*E/P .. (r+1)*E/P - 1`, as Megatron-Core places them). Every rank
routes its own tokens over all E experts; then:

- `dispatch`: the (token, expert) pairs are sorted by global expert (expert order, token order
  inside, like the single-device dispatcher), the pairs of each rank's experts are sent to it
  with their routing weights (an uneven all-to-all, differentiable:
  `all_to_all_single_autograd`), and what arrives (source-rank major) is regrouped by local
  expert (local-expert major, source rank inside), so the experts see their tokens as one block
  each, exactly as `SequentialMLP` expects;
- `combine`: the reverse regrouping, the reverse all-to-all, and a scatter-add of each pair's
  weighted output back onto its token.

The model's `MoELayer` calls the dispatcher it was given (`MoELayer.token_dispatcher`); this one
is injected by `mtp_cli.parallel.expert_parallel`, so the model code stays single-device.
The backward of both all-to-alls is the reverse all-to-all: gradients reach the router (through
the routing weights) and the tokens' hidden states on the rank that owns them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from mtp_cli.models.moe.dispatcher import DispatchedTokens


@dataclass
class AllToAllHandle:
    """What `combine` needs to undo `dispatch`."""

    token_index: torch.Tensor  # [N_send] source token of each sent row (global-expert order)
    send_splits: list[int]  # rows sent to each EP rank
    recv_splits: list[int]  # rows received from each EP rank
    regroup: torch.Tensor  # [N_recv] received row -> local-expert-major position


def expert_block(num_experts: int, ep_size: int, ep_rank: int) -> list[int]:
    """The global expert indices rank `ep_rank` of an expert-parallel group of `ep_size` holds."""
    per_rank = num_experts // ep_size
    return list(range(ep_rank * per_rank, (ep_rank + 1) * per_rank))


def regroup_index(counts: torch.Tensor) -> torch.Tensor:
    """For rows arriving as `counts [P, L]` blocks (source-rank major, local expert inside),
    the order that makes them local-expert major (source rank inside): `rows[index]`.
    Vectorised (no loop over blocks), on the device of `counts`."""
    flat = counts.reshape(-1)
    starts = (torch.cumsum(flat, 0) - flat).reshape(counts.shape)
    block_starts, block_counts = starts.t().reshape(-1), counts.t().reshape(-1)
    total = int(flat.sum())
    offsets = torch.cumsum(block_counts, 0) - block_counts
    within = torch.arange(total, device=counts.device) - torch.repeat_interleave(
        offsets, block_counts, output_size=total)
    return torch.repeat_interleave(block_starts, block_counts, output_size=total) + within


class AllToAllTokenDispatcher:
    """Exchanges routed tokens between the ranks of an expert-parallel group (see the module)."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup) -> None:
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.local_expert_indices = expert_block(num_experts, self.ep_size, self.ep_rank)

    def dispatch(self, hidden: torch.Tensor, probs: torch.Tensor,
                 routing_map: torch.Tensor) -> DispatchedTokens:
        """`hidden [T, h]`, `probs [T, E]`, `routing_map [T, E]` (this rank's tokens, all E
        experts) -> the pairs of this rank's experts from every rank of the group."""
        mask = routing_map.t()  # [E, T]
        token_index = mask.nonzero(as_tuple=True)[1]
        weights = probs.t()[mask]
        per_expert = mask.sum(dim=1)  # [E]
        local = len(self.local_expert_indices)
        send_counts = per_expert.reshape(self.ep_size, local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)
        send_splits = send_counts.sum(dim=1).tolist()
        recv_splits = recv_counts.sum(dim=1).tolist()
        tokens = all_to_all_single_autograd(hidden[token_index].contiguous(), recv_splits,
                                            send_splits, self.group)
        received_probs = all_to_all_single_autograd(weights.unsqueeze(1).contiguous(),
                                                    recv_splits, send_splits, self.group)
        regroup = regroup_index(recv_counts)
        handle = AllToAllHandle(token_index, send_splits, recv_splits, regroup)
        return DispatchedTokens(tokens[regroup], received_probs.squeeze(1)[regroup],
                                recv_counts.sum(dim=0).tolist(), handle)

    def combine(self, expert_output: torch.Tensor, dispatched: DispatchedTokens,
                num_tokens: int) -> torch.Tensor:
        """The experts' weighted outputs back to the ranks that own the tokens, summed per token:
        `[N_recv, h]` -> `[T, h]`."""
        handle: AllToAllHandle = dispatched.handle
        inverse = torch.empty_like(handle.regroup)
        inverse[handle.regroup] = torch.arange(len(handle.regroup), device=inverse.device)
        source_order = expert_output[inverse]
        returned = all_to_all_single_autograd(source_order.contiguous(), handle.send_splits,
                                              handle.recv_splits, self.group)
        out = returned.new_zeros(num_tokens, returned.shape[-1])
        return out.index_add(0, handle.token_index, returned)
