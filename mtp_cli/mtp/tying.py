"""One tensor per logical weight in checkpoints, however many stages hold a copy.

A pipeline stage with MTP layers but no embedding keeps a copy of the word embedding, and a tied
loss stage keeps one as its output weight (MTP_REFERENCE.md section 7). A checkpoint must store
the logical weight once, under the main key, so that every holder - at any later layout - loads
the same tensor. DCP keeps one value per key silently, so these functions first assert that the
copy really equals the main weight (and that data/context-parallel replicas agree), then rewrite
the state dict in place. Megatron-Core's names; the state dicts here hold full (unsharded)
tensors. The replica check broadcasts through the `ModelComm` of `dp_cp_group`.
"""

from __future__ import annotations

from typing import Any

import torch

from mtp_cli.nn.comm import Group, ModelComm, comm_for

WORD_EMBEDDING_KEY = "embedding.word_embeddings.weight"
OUTPUT_LAYER_KEY = "output_layer.weight"


class TiedCopyMismatchError(RuntimeError):
    """A copy of a tied weight drifted from the main weight: saving would lose one of them."""


def _assert_equal(copy: torch.Tensor, main: torch.Tensor, what: str) -> None:
    if copy.shape != main.shape or not torch.equal(copy.detach().cpu(), main.detach().cpu()):
        diff = (copy.detach().float().cpu() - main.detach().float().cpu()).abs().max() \
            if copy.shape == main.shape else float("nan")
        raise TiedCopyMismatchError(
            f"{what} differs from the main weight (max |diff| {float(diff):.3g})")


def _assert_replicas_equal(tensor: torch.Tensor, group: Group, comm: ModelComm | None,
                           what: str) -> None:
    """Every rank of `group` (data x context parallel replicas) holds the same values."""
    comm = comm_for(group, comm)
    if comm.size(group) == 1:
        return
    reference = comm.broadcast(tensor.detach().clone(), group, src=0)
    _assert_equal(tensor, reference, f"{what} on this replica")


def _store_once(state_dict: dict[str, Any], copy_key: str, main: torch.Tensor, main_key: str,
                dp_cp_group: Group, comm: ModelComm | None, what: str) -> None:
    copy = state_dict.pop(copy_key, None)
    if copy is not None:
        _assert_equal(copy, main, f"{what} '{copy_key}'")
    _assert_replicas_equal(main, dp_cp_group, comm, main_key)
    state_dict[main_key] = main


def tie_word_embeddings_state_dict(
    state_dict: dict[str, Any],
    word_emb_weight: torch.Tensor,
    word_emb_weight_key: str = WORD_EMBEDDING_KEY,
    tp_group: Group = None,
    dp_cp_group: Group = None,
    *,
    copy_key: str = WORD_EMBEDDING_KEY,
    comm: ModelComm | None = None,
) -> None:
    """Store an MTP stage's embedding copy (`copy_key`) as the main weight, checked equal.

    `word_emb_weight` is the first stage's weight (full tensor; gathered over `tp_group` by the
    caller when sharded). After the call `state_dict` holds it under `word_emb_weight_key` only.
    """
    _store_once(state_dict, copy_key, word_emb_weight, word_emb_weight_key, dp_cp_group, comm,
                "the MTP stage's copy")


def tie_output_layer_state_dict(
    state_dict: dict[str, Any],
    word_emb_weight: torch.Tensor,
    word_emb_weight_key: str = WORD_EMBEDDING_KEY,
    tp_group: Group = None,
    dp_cp_group: Group = None,
    *,
    output_layer_key: str = OUTPUT_LAYER_KEY,
    comm: ModelComm | None = None,
) -> None:
    """Store a tied loss stage's output weight (`output_layer_key`) as the word embedding."""
    _store_once(state_dict, output_layer_key, word_emb_weight, word_emb_weight_key, dp_cp_group,
                comm, "the tied output weight")
