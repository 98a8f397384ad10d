"""Teacher-forced computations over whole sequences, without any cache.

`depth_logits` is what training computes: one forward of the decoder and of the MTP block over
`[b, s]` ids (the block rolls ids and positions itself), giving every depth's logits at every
row. Speculative decoding is checked against it (drafts, acceptance counts) and `mtp eval`
derives its acceptance proxies from it.
"""

from __future__ import annotations

import torch

from mtp_cli.gpt import GPTModel


@torch.no_grad()
def depth_hidden(model: GPTModel, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """`[h0, h1, ..., hD]`, each `[s, b, h]`, for `input_ids [b, s]` (positions 0..s-1)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    h0 = model.decode_hidden(input_ids, positions, None)
    if model.mtp is None:
        return [h0]
    rotary = model.rotary_pos_emb(positions) if model.rotary_pos_emb is not None else None
    stacked = model.mtp(input_ids, positions, h0, None, embedding=model.embedding,
                        rotary_pos_emb=rotary)
    return list(stacked.chunk(1 + model.mtp.num_depths, dim=0))


@torch.no_grad()
def depth_logits(model: GPTModel, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """`[b, s, V]` logits of the main model and of each depth: row i of depth k predicts token
    `i + k + 1`."""
    return [model.logits(h) for h in depth_hidden(model, input_ids)]


def prefix_counts(matches: list[torch.Tensor]) -> torch.Tensor:
    """`[b, s]`: at each row, how many leading depths matched (`matches[k-1]` is depth k's)."""
    count = torch.zeros_like(matches[0], dtype=torch.long)
    alive = torch.ones_like(matches[0], dtype=torch.bool)
    for match in matches:
        alive = alive & match
        count = count + alive.long()
    return count


def shifted(values: torch.Tensor, shift: int, fill: int = -1) -> torch.Tensor:
    """`[b, s]` -> `[b, s]` with `out[:, i] = values[:, i + shift]` (`fill` past the end)."""
    out = torch.full_like(values, fill)
    if values.shape[1] > shift:
        out[:, :values.shape[1] - shift] = values[:, shift:]
    return out


def joint_prefix_counts(logits: list[torch.Tensor], sequence: torch.Tensor,
                        depths: int | None = None) -> torch.Tensor:
    """`[b, s]`: at row i, how many leading depths k = 1.. have `argmax(depth k, row i)` equal to
    `sequence[:, i + k + 1]`: on a sequence a greedy decoder produced, the drafts a greedy
    verifier accepts when its last committed token is `i + 1` (0 past the sequence's end)."""
    depths = len(logits) - 1 if depths is None else depths
    return prefix_counts([logits[k].argmax(-1) == shifted(sequence, k + 1)
                          for k in range(1, depths + 1)])
