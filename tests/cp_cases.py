"""The context-parallel check (CP model vs the unsharded one, on real gloo processes) and
the zigzag shard it compares with, shared by the context-parallel tests."""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from mtp_cli import build_model, load_spec
from mtp_cli.mtp import MTPLossLoggingHelper, PackedSeqParams
from mtp_cli.parallel.context_parallel import apply_context_parallel, zigzag_positions


def zigzag_shard(sequence: torch.Tensor, boundaries: list[int], rank: int, cp: int
                 ) -> torch.Tensor:
    """Rank `rank`'s load-balanced shard: per document, chunk r then chunk 2cp-1-r."""
    pieces = []
    for start, end in itertools.pairwise(boundaries):
        chunk = (end - start) // (2 * cp)
        doc = sequence[..., start:end]
        pieces += [doc[..., rank * chunk:(rank + 1) * chunk],
                   doc[..., (2 * cp - 1 - rank) * chunk:(2 * cp - rank) * chunk]]
    return torch.cat(pieces, dim=-1)


SEQ = 16


def make_spec():
    return load_spec({"model": {"vocab_size": 40, "hidden_size": 16, "num_layers": 2,
                                "num_attention_heads": 4, "num_query_groups": 2,
                                "seq_length": SEQ, "position_embedding": "rope",
                                "normalization": "RMSNorm", "activation": "swiglu"},
                      "mtp": {"num_layers": 2}})


def make_batch(packed_lengths: list[int] | None):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 40, (1, SEQ), generator=generator)
    labels = torch.randint(1, 40, (1, SEQ), generator=generator)
    mask = (torch.rand(1, SEQ, generator=generator) > 0.2).float()
    if packed_lengths is None:
        return ids, torch.arange(SEQ)[None], labels, mask, None, [0, SEQ]
    positions = torch.cat([torch.arange(n) for n in packed_lengths])[None]
    params = PackedSeqParams.from_lengths(packed_lengths)
    boundaries = params.cu_seqlens_q.tolist()
    return ids, positions, labels, mask, params, boundaries


def objective(model, ids, positions, labels, mask, params, total_tokens):
    per_token = model(ids, positions, labels=labels, loss_mask=mask, packed_seq_params=params)
    return per_token, (per_token * mask).sum() / total_tokens


def check_context_parallel(rank, world, packed_lengths):
    spec = make_spec()
    ids, positions, labels, mask, params, boundaries = make_batch(packed_lengths)
    reference = build_model(spec)
    ref_tokens, ref_loss = objective(reference, ids, positions, labels, mask, params, mask.sum())
    ref_loss.backward()
    ref_mtp = MTPLossLoggingHelper.tracker["values"].clone()
    MTPLossLoggingHelper.reset()

    group = dist.new_group(list(range(world)))
    model = build_model(spec)
    apply_context_parallel(model, group)
    shard = [zigzag_shard(t, boundaries, rank, world) for t in (ids, positions, labels, mask)]
    assert torch.equal(zigzag_positions(SEQ // world, rank, world, params),
                       zigzag_shard(torch.arange(SEQ), boundaries, rank, world))
    tokens, loss = objective(model, *shard, params, mask.sum())
    loss.backward()
    torch.testing.assert_close(tokens, zigzag_shard(ref_tokens.detach(), boundaries, rank, world),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(MTPLossLoggingHelper.tracker["values"], ref_mtp, atol=1e-5, rtol=0)
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad, group=group)  # CP ranks hold different tokens: gradients add up
        torch.testing.assert_close(grad, dict(reference.named_parameters())[name].grad,
                                   atol=1e-5, rtol=1e-4, msg=name)
