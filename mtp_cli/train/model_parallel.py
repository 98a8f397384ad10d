"""The embedding group of a pipeline: the ranks holding the embedding or a copy of it.

A stage with MTP layers but no embedding keeps a copy of the word embedding, and a tied loss
stage keeps one as its output weight. Their gradients are summed over the ranks holding the
embedding or a copy, one group per (data, context, tensor) coordinate, so that every copy takes
the same update (`mtp_cli.parallel.tied_embeddings`), and checkpoints check the copies against
the first stage's weight over the same group (`mtp_cli.train.model_parallel_state`). Which
pipeline ranks hold one is decided here; the mesh makes the groups.
"""

from __future__ import annotations

from mtp_cli.config.schema import RunSpec
from mtp_cli.parallel.mesh import ParallelMesh
from mtp_cli.plan.stages import StagePlan
from mtp_cli.train.model_parallel_state import EmbeddingGroup


def embedding_holders(plan: StagePlan, spec: RunSpec) -> list[int]:
    """The pipeline ranks holding the embedding or a copy of it."""
    tied = spec.model.share_embeddings_and_output_weights
    return sorted({entry.pp_rank for entry in plan.stages
                   if entry.embedding or entry.mtp_layers or (entry.loss and tied)})


def build_embedding_group(plan: StagePlan, spec: RunSpec, mesh: ParallelMesh
                          ) -> EmbeddingGroup | None:
    """This rank's embedding group (collective: every rank takes part in creating all of
    them); None when this rank holds neither the embedding nor a copy."""
    found = mesh.embedding_group(embedding_holders(plan, spec))
    if found is None:
        return None
    group, members = found
    return EmbeddingGroup(group=group, src=members[0])
