"""Shard rules by hand (no processes), and a TP size of 1 leaving the model alone."""

from __future__ import annotations

import pytest
import torch

from mtp_cli import build_model
from mtp_cli.models.output import OutputHead
from mtp_cli.parallel.tensor_parallel import canonical_name, parallelize_tensor
from mtp_cli.parallel.tp_sharding import COLUMN, GATED_COLUMN, ROW
from tests.tp_cases import make_spec


def test_gated_fc1_rank_holds_its_gate_rows_and_their_up_rows():
    full = torch.arange(8.0)[:, None]  # rows 0-3: gate, rows 4-7: up
    assert GATED_COLUMN.shard(full, 0, 2).flatten().tolist() == [0, 1, 4, 5]
    assert GATED_COLUMN.shard(full, 1, 2).flatten().tolist() == [2, 3, 6, 7]
    shards = [GATED_COLUMN.shard(full, r, 2) for r in range(2)]
    assert torch.equal(GATED_COLUMN.unshard(shards), full)


def test_column_rows_and_row_columns_split_contiguously():
    full = torch.arange(24.0).view(4, 6)
    assert torch.equal(COLUMN.shard(full, 1, 2), full[2:])
    assert torch.equal(ROW.shard(full, 2, 3), full[:, 4:])
    assert torch.equal(ROW.unshard([ROW.shard(full, r, 3) for r in range(3)]), full)
    assert ROW.full_shape(torch.Size([4, 2]), 3) == torch.Size([4, 6])
    assert GATED_COLUMN.full_shape(torch.Size([4, 6]), 2) == torch.Size([8, 6])
    with pytest.raises(ValueError, match="does not split"):
        GATED_COLUMN.shard(torch.zeros(6, 1), 0, 2)


def test_canonical_name_drops_wrapper_segments():
    assert canonical_name("module.decoder.layers.0.mlp.linear_fc1.weight") == \
        "decoder.layers.0.mlp.linear_fc1.weight"
    assert canonical_name("decoder.layers.0._checkpoint_wrapped_module.mlp.linear_fc1.weight") \
        == "decoder.layers.0.mlp.linear_fc1.weight"


def test_tensor_parallel_size_one_leaves_the_model_unchanged():
    model = build_model(make_spec("llama", 1, False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = parallelize_tensor(model, None)
    assert plan.size == 1 and not plan.rules
    assert isinstance(model.output_head, OutputHead)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    assert plan.gather_like_parameter(name, before[name]) is before[name]
    with pytest.raises(ValueError, match="sequence parallel needs a tensor group"):
        parallelize_tensor(build_model(make_spec("llama", 1, False)), None,
                           sequence_parallel=True)
