"""Pipeline schedules on real gloo processes against the single-process model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mtp_cli import build_model, load_spec
from mtp_cli.mtp import MTPLossLoggingHelper
from mtp_cli.parallel.pipeline_schedule import PipelineLayout, PipelineSchedule
from mtp_cli.parallel.tied_embeddings import allreduce_embedding_grads
from mtp_cli.plan.stages import Stage
from tests.dist_utils import run_distributed

SEQ, MICRO, COUNT = 8, 2, 4


def spec(depths: int, tied: bool):
    return load_spec({"model": {"vocab_size": 40, "hidden_size": 16, "num_layers": 4,
                                "num_attention_heads": 2, "seq_length": SEQ,
                                "share_embeddings_and_output_weights": tied},
                      "mtp": {"num_layers": depths}})


class Batch:
    def __init__(self, seed: int):
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, 40, (MICRO, SEQ + 1), generator=generator)
        self.input_ids, self.labels = tokens[:, :-1], tokens[:, 1:]
        self.position_ids = torch.arange(SEQ).expand(MICRO, SEQ)
        self.loss_mask = (torch.rand(MICRO, SEQ, generator=generator) > 0.1).float()
        self.packed_seq_params = None


def loss_fn(per_token, batch):
    return (per_token * batch.loss_mask).sum() / batch.loss_mask.sum() / COUNT


def reference(run_spec):
    model = build_model(run_spec)
    for seed in range(COUNT):
        batch = Batch(seed)
        loss_fn(model(batch.input_ids, batch.position_ids, labels=batch.labels,
                      loss_mask=batch.loss_mask), batch).backward()
    values = MTPLossLoggingHelper.tracker.get("values")
    return ({n: p.grad for n, p in model.named_parameters()},
            values.clone() if values is not None else None)


# stage contents per global stage index: (decoder layers, embedding, final norm, mtp, loss)
LAYOUTS = {
    "pp2": [([1, 2], True, False, 0, False), ([3, 4], False, True, 1, True)],
    "pp2_vpp2": [([1], True, False, 0, False), ([2], False, False, 0, False),
                 ([3], False, False, 0, False), ([4], False, True, 1, True)],
    "pp2_vpp2_standalone_mtp": [([1, 2], True, False, 0, False), ([3, 4], False, True, 0, False),
                                ([], False, False, 1, False), ([], False, False, 0, True)],
}


def _run(rank, world, layout_name, depths, tied):
    MTPLossLoggingHelper.reset()
    run_spec = spec(depths, tied)
    stages = LAYOUTS[layout_name]
    stage_indices = [i for i in range(len(stages)) if i % world == rank]
    chunks = []
    mtp_stage = None
    for index, (layers, embedding, final, mtp, loss) in enumerate(stages):
        if mtp:
            mtp_stage = index
        if index not in stage_indices:
            continue
        contents = Stage(decoder_layers=tuple(layers), embedding=embedding,
                                 final_layernorm=final, mtp_layers=depths if mtp else 0,
                                 loss=loss, mtp_depths_in_loss=depths if loss else 0)
        chunks.append(build_model(run_spec, stage=contents))
    group = dist.new_group(list(range(world)))
    layout = PipelineLayout(pp_group=group, pp_rank=rank, pp_size=world, num_stages=len(stages),
                            stage_indices=stage_indices, hidden_shape=(SEQ, MICRO, 16),
                            mtp_stage_index=mtp_stage if depths else None, mtp_depths=depths)
    losses = PipelineSchedule(chunks, layout).step([Batch(s) for s in range(COUNT)], loss_fn)
    allreduce_embedding_grads(chunks, group)
    expected_grads, expected_mtp = reference(run_spec)
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            source = "embedding.word_embeddings.weight" if (
                tied and name == "output_layer.weight") else name
            torch.testing.assert_close(param.grad, expected_grads[source], atol=1e-6, rtol=1e-5,
                                       msg=f"{layout_name} rank {rank} {name}")
    if len(stages) - 1 in stage_indices:
        assert len(losses) == COUNT
        if depths:
            values = MTPLossLoggingHelper.tracker["values"]
            torch.testing.assert_close(values, expected_mtp, atol=1e-6, rtol=0)


@pytest.mark.distributed
@pytest.mark.parametrize("layout_name,depths,tied", [
    ("pp2", 1, False), ("pp2_vpp2", 1, True), ("pp2_vpp2_standalone_mtp", 1, True),
])
def test_pipeline_gradients_equal_single_process(layout_name, depths, tied):
    run_distributed(_run, 2, layout_name, depths, tied)
