"""The output head: logits, per-token cross-entropy and argmax hits.

Logits are computed in the activations' dtype and the cross-entropy in fp32, as Megatron-Core
does. The MTP depths reuse the main model's output weight (or the word embedding when tied).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtp_cli.nn.comm import Group, ModelComm


def logits_from_hidden(hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`[s, b, h]` x `[V, h]` -> `[s, b, V]`."""
    return F.linear(hidden_states, weight)


def cross_entropy_per_token(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`[s, b, V]` logits, `[b, s]` labels -> unmasked per-token loss `[b, s]` (fp32)."""
    seq_len, batch, vocab = logits.shape
    loss = F.cross_entropy(logits.float().reshape(-1, vocab), labels.transpose(0, 1).reshape(-1),
                           reduction="none")
    return loss.view(seq_len, batch).transpose(0, 1)


def argmax_hits(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How many unmasked positions the head's top-1 guess gets right (MTP acceptance)."""
    predicted = logits.argmax(dim=-1).transpose(0, 1)  # [b, s]
    return ((predicted == labels) & (mask > 0)).sum()


def token_loss_and_hits(hidden_states: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                        *, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss `[b, s]` and argmax hits for one head, computing full logits."""
    logits = logits_from_hidden(hidden_states, weight)
    with torch.no_grad():
        hits = argmax_hits(logits, labels, mask)
    return cross_entropy_per_token(logits, labels), hits


class OutputHead:
    """How the model turns hidden states into logits and losses: one device, full logits.

    `GPTModel.output_head` holds one; tensor parallel swaps in a vocab-parallel head with the
    same four methods (`mtp_cli.parallel.vocab_parallel.VocabParallelOutputHead`), so the model
    code stays single-device. `group`, `comm` and `head_input` let the chunked head
    (`mtp_cli.models.chunked_ce.ChunkedOutputHead`) wrap either.
    """

    group: Group = None  # the output weight's vocab shards (None: all here)
    comm: ModelComm | None = None  # what reduces over `group` (None: `comm_for(group)`)

    def head_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The `[s, b, h]` the output weight multiplies (the full sequence, replicated)."""
        return hidden_states

    def local_sequence_length(self, seq_len: int) -> int:
        """Rows of `[s, b, h]` this process holds per head (sequence parallel splits them)."""
        return seq_len

    def logits(self, hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Full `[s, b, V]` logits."""
        return logits_from_hidden(hidden_states, weight)

    def local_logits(self, hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This process's vocabulary shard of the logits `[s, b, V]` (here: all of it)."""
        return logits_from_hidden(hidden_states, weight)

    def loss_and_hits_from_logits(self, logits: torch.Tensor, labels: torch.Tensor,
                                  mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`token_loss_and_hits` from `local_logits` already computed (`mtp.distill` reads the
        same logits for its KL term, so the depth's projection runs once)."""
        with torch.no_grad():
            hits = argmax_hits(logits, labels, mask)
        return cross_entropy_per_token(logits, labels), hits

    def per_token_loss(self, hidden_states: torch.Tensor, labels: torch.Tensor,
                       weight: torch.Tensor) -> torch.Tensor:
        """Unmasked per-token cross-entropy `[b, s]` (fp32)."""
        return cross_entropy_per_token(logits_from_hidden(hidden_states, weight), labels)

    def token_loss_and_hits(self, hidden_states: torch.Tensor, labels: torch.Tensor,
                            mask: torch.Tensor, *, weight: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token loss and argmax hits of one MTP depth (see `token_loss_and_hits`)."""
        return token_loss_and_hits(hidden_states, labels, mask, weight=weight)
