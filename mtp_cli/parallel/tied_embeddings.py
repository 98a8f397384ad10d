"""Embedding copies across pipeline stages (MTP_REFERENCE.md section 7).

A stage that holds MTP layers but not the embedding keeps its own copy of the embedding (to
embed the rolled tokens and positions); a loss stage keeps a copy of the word embedding as its
output weight when embeddings and output are tied. Copies start equal (initialised from the same
global name) and stay equal: their gradients are summed over every holder - the chunks of this
rank, then the "embedding group" of ranks - before the optimizer step, so every copy takes the
same update. Learned position embeddings are copied and kept in step the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from mtp_cli.gpt import GPTModel
from mtp_cli.parallel.fsdp_local import fsdp_coordinates, fsdp_rows, held, like

WORD_EMBEDDING = "embedding.word_embeddings.weight"
POSITION_EMBEDDING = "embedding.position_embeddings.weight"


def embedding_copies(chunks: Sequence[GPTModel]) -> dict[str, list[nn.Parameter]]:
    """This rank's tensors holding each logical embedding weight (main weight or copies)."""
    copies: dict[str, list[nn.Parameter]] = {WORD_EMBEDDING: [], POSITION_EMBEDDING: []}
    for chunk in chunks:
        if chunk.embedding is not None:
            copies[WORD_EMBEDDING].append(chunk.embedding.word_embeddings.weight)
            if chunk.embedding.position_embeddings is not None:
                copies[POSITION_EMBEDDING].append(chunk.embedding.position_embeddings.weight)
        if chunk.share_embeddings_and_output_weights and chunk.output_layer is not None:
            copies[WORD_EMBEDDING].append(chunk.output_layer.weight)
    return copies


def holds_embedding(chunks: Sequence[GPTModel]) -> bool:
    return bool(embedding_copies(chunks)[WORD_EMBEDDING])


def _position_shape(chunk: GPTModel) -> tuple[int, int] | None:
    config = chunk.config
    if config.position_embedding != "learned_absolute":
        return None
    return (config.max_position_embeddings, config.hidden_size)


def allreduce_embedding_grads(chunks: Sequence[GPTModel],
                              group: dist.ProcessGroup | None) -> None:
    """Give every copy of an embedding weight the gradient of the logical weight.

    Every rank of `group` must call this (it holds at least the word embedding); a member
    without a position-embedding copy contributes zeros.
    """
    copies = embedding_copies(chunks)
    if not copies[WORD_EMBEDDING]:
        return
    distributed = group is not None and dist.get_world_size(group) > 1
    position_shape = _position_shape(chunks[0])
    for name, tensors in copies.items():
        if name == POSITION_EMBEDDING and position_shape is None:
            continue
        reference = held(tensors[0]) if tensors else None
        if reference is None:
            if not distributed:
                continue
            # FSDP2's rows of the position table where the copies are FSDP-sharded
            start, end = fsdp_rows(position_shape[0],
                                   *fsdp_coordinates(copies[WORD_EMBEDDING][0]))
            reference = held(copies[WORD_EMBEDDING][0]).new_zeros(
                (end - start, position_shape[1]))
        total = torch.zeros_like(reference)
        for copy in tensors:
            if copy.grad is not None:
                total += held(copy.grad)
        if distributed:
            dist.all_reduce(total, group=group)
        for copy in tensors:
            if copy.grad is None:
                copy.grad = like(copy, total.clone())
            else:
                held(copy.grad).copy_(total)
