"""The embedding group of a pipeline: the ranks holding the embedding or a copy of it.

A stage with MTP layers but no embedding keeps a copy of the word embedding, and a tied loss
stage keeps one as its output weight. Their gradients are summed over the ranks holding the
embedding or a copy, one group per (data, context, tensor) coordinate, so that every copy takes
the same update (`mtp_cli.parallel.tied_embeddings`), and checkpoints check the copies against
the first stage's weight over the same group (`mtp_cli.train.model_parallel_state`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mtp_cli.config.schema import RunSpec
from mtp_cli.parallel.mesh import ParallelMesh
from mtp_cli.plan.stages import StagePlan
from mtp_cli.train.model_parallel_state import EmbeddingGroup


def build_embedding_group(plan: StagePlan, spec: RunSpec, mesh: ParallelMesh
                          ) -> EmbeddingGroup | None:
    """One group per (data, context, tensor) coordinate of the pipeline ranks holding the
    embedding or a copy of it; every rank takes part in creating all of them."""
    tied = spec.model.share_embeddings_and_output_weights
    holders = sorted({entry.pp_rank for entry in plan.stages
                      if entry.embedding or entry.mtp_layers or (entry.loss and tied)})
    ranks = mesh.mesh.mesh  # global ranks, shape (pp, dp, cp, tp)
    me = dist.get_rank()
    mine: EmbeddingGroup | None = None
    for coordinate in torch.cartesian_prod(*[torch.arange(n) for n in ranks.shape[1:]]) \
            .reshape(-1, 3).tolist():
        members = [int(ranks[(p, *coordinate)]) for p in holders]
        group = dist.new_group(members) if len(members) > 1 else None
        if me in members:
            mine = EmbeddingGroup(group=group, src=members[0])
    return mine
