"""Hidden-state mixing (Megatron-LM's `mtp_hsm`, `--mtp-hsm`, added after Megatron-Core 0.19 by
PR #6566; names kept): in training, with D >= 2, depth 1 takes the main model's final hidden
state as always; at depth k >= 2 each token independently draws, uniformly, its input from the
main model's state and the outputs of depths 1..k-1, each rolled to the same target (older
entries rolled left once more per depth). A rolled position that is all zeros (the sequence end,
or a document seam when packed) falls back to the newest candidate.

The draw is one mask `[1, s, b, 1]` per logical sequence from the run's mixing stream
(`MTPRunState.hsm_generator`: keyed by train.seed, the data-parallel rank and the step, so
identical on every tensor rank and reproducible after a resume). Context and sequence parallel,
where Megatron slices the mask per owner, are refused by the spec rules here.
"""

from __future__ import annotations

import torch

from mtp_cli.mtp.roll import roll_tensor
from mtp_cli.nn.packed import PackedSeqParams


def _mix_hidden_state_history(older_hidden_states: torch.Tensor,
                              newest_hidden_state: torch.Tensor,
                              indices: torch.Tensor) -> torch.Tensor:
    """Per token, the candidate `indices [1, s, b, 1]` names (0..n-1: an older state, n: the
    newest); an all-zero older state gives the newest instead. `older [n, s, b, h]`."""
    num_older = older_hidden_states.size(0)
    hidden_size = newest_hidden_state.size(-1)
    selected_is_newest = indices.eq(num_older)
    older_indices = indices.clamp_max(num_older - 1)
    invalid_locations = older_hidden_states.eq(0).all(dim=-1, keepdim=True)
    selected_is_invalid = torch.gather(invalid_locations, dim=0, index=older_indices)
    use_newest = selected_is_newest | selected_is_invalid
    selected_older = torch.gather(older_hidden_states, dim=0,
                                  index=older_indices.expand(-1, -1, -1, hidden_size))
    return torch.where(use_newest.expand_as(selected_older), newest_hidden_state.unsqueeze(0),
                       selected_older).squeeze(0)


def draw_indices(num_states: int, newest: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """The uniform draw `[1, s, b, 1]` over `num_states` candidates."""
    s, b, _ = newest.shape
    return torch.randint(num_states, (1, s, b, 1), generator=generator,
                         device=newest.device)


def roll_older(history: list[torch.Tensor],
               packed_seq_params: PackedSeqParams | None) -> list[torch.Tensor]:
    """Every entry but the newest rolled left by one along the sequence (packed: within each
    document, zero at its end), as Megatron rolls its flattened `[n*b, h, s]` stack."""
    older = torch.stack(history[:-1], dim=0)  # [n, s, b, h]
    n, s, b, h = older.shape
    flat = older.permute(0, 2, 3, 1).reshape(n * b, h, s)
    rolled, _ = roll_tensor(flat, -1, -1, None, packed_seq_params)
    return list(rolled.reshape(n, b, h, s).permute(0, 3, 1, 2).unbind(0))
