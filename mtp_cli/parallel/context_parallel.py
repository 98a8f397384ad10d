"""Context parallel attention: each rank holds a load-balanced shard of every sequence.

Sharding ("zigzag"): the sequence - or, when packed, each document padded to a multiple of 2*cp -
is cut into 2*cp chunks; rank r holds chunk r and chunk 2cp-1-r, so causal work is balanced.

Attention all-gathers keys and values over the context-parallel group and applies the exact
causal (and packed-document) mask between the global positions of the local queries and of all
keys. The gather's backward all-reduces the key/value gradients and keeps the local slice. This
costs O(s) key/value memory per rank (ring attention would not) but is exact, simple, and runs on
gloo and nccl alike.

Multi-latent attention runs through the same core: its query/key heads are `qk_head_dim +
qk_pos_emb_head_dim` wide and its value heads `v_head_dim`, its softmax scale is the local core's
(YaRN's correction), and its rotary angles come from the batch's position ids, which the zigzag
sharding keeps global (`mtp_cli.data.context_parallel`), so RoPE and YaRN see the global positions.

"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mtp_cli.models.attention import DotProductAttention
from mtp_cli.nn.packed import PackedSeqParams
from mtp_cli.parallel.comm import DIST_COMM
from mtp_cli.plan.zigzag import zigzag_positions as zigzag_index


def zigzag_positions(local_length: int, cp_rank: int, cp_size: int,
                     packed_seq_params: PackedSeqParams | None = None) -> torch.Tensor:
    """Global sequence index of each of this rank's `local_length` tokens."""
    if packed_seq_params is None:
        boundaries = [0, local_length * cp_size]
    else:
        boundaries = packed_seq_params.attention_boundaries().tolist()
    return torch.tensor(zigzag_index(boundaries, cp_rank, cp_size, local_length))


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 of `[s_local, ...]`; backward sums gradients, keeps the slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.length = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.length:(ctx.rank + 1) * ctx.length], None


def gather_sequence(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's `[s_local, ...]` shard (rank order), with autograd."""
    return _GatherSequence.apply(tensor, group)


def _document_ids(positions: torch.Tensor, packed_seq_params: PackedSeqParams | None
                  ) -> torch.Tensor:
    if packed_seq_params is None:
        return torch.zeros_like(positions)
    boundaries = packed_seq_params.attention_boundaries().to(positions.device)
    return torch.bucketize(positions, boundaries[1:], right=True)


class ContextParallelAttention(nn.Module):
    """Wraps a local core attention: gathers keys/values over the CP group, exact masks."""

    def __init__(self, local: DotProductAttention, cp_group: dist.ProcessGroup) -> None:
        super().__init__()
        self.local = local
        self.cp_group = cp_group

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                packed_seq_params: PackedSeqParams | None = None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("context parallel attention supports causal (and packed) masks only")
        cp_size, cp_rank = dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)
        seq_local, batch, heads, _ = query.shape
        keys = gather_sequence(key, self.cp_group)  # [cp * s_local, b, g, d], rank order
        values = gather_sequence(value, self.cp_group)
        query_pos = zigzag_positions(seq_local, cp_rank, cp_size, packed_seq_params)
        key_pos = torch.cat([zigzag_positions(seq_local, r, cp_size, packed_seq_params)
                             for r in range(cp_size)])
        query_pos, key_pos = query_pos.to(query.device), key_pos.to(query.device)
        allowed = key_pos[None, :] <= query_pos[:, None]
        allowed &= (_document_ids(query_pos, packed_seq_params)[:, None]
                    == _document_ids(key_pos, packed_seq_params)[None, :])
        q = query.permute(1, 2, 0, 3)
        k, v = keys.permute(1, 2, 0, 3), values.permute(1, 2, 0, 3)
        if k.shape[1] != heads:
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        dropout = self.local.dropout if self.training else 0.0
        # MLA: the local core's softmax scale (YaRN-corrected, over the nope + rope query
        # width) and a value head narrower than the query/key head
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout,
                                             scale=self.local.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(seq_local, batch, heads * v.shape[-1])


def apply_context_parallel(model: nn.Module, cp_group: dist.ProcessGroup) -> None:
    """Make every core attention of `model` context-parallel over `cp_group`, in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, DotProductAttention):
                setattr(module, name, ContextParallelAttention(child, cp_group))
    if hasattr(model, "groups"):  # the MTP rolls and loss sums exchange over it
        model.groups.cp_group = cp_group
        model.groups.comm = DIST_COMM
