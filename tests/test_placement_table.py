"""Placement per (pp_rank, vp_stage): the reference's examples and the split without a layout."""

from __future__ import annotations

import pytest

from mtp_cli.errors import SpecError
from mtp_cli.mtp import get_mtp_layer_offset, get_mtp_num_layers_to_build
from mtp_cli.plan.placement import (
    build_stage_plan,
    get_decoder_layer_numbers,
    get_num_layers_to_build,
    get_transformer_layer_offset,
)
from tests.placement_helpers import make_spec


def per_stage(spec, function) -> list[int]:
    """`function(spec, vp_stage, pp_rank)` for every stage, in layer order."""
    pp, vpp = spec.parallel.pipeline, spec.parallel.virtual_pipeline
    vps = [None] if vpp is None else range(vpp)
    return [function(spec, vp, rank) for vp in vps for rank in range(pp)]


def test_no_layout_puts_all_mtp_layers_on_the_last_rank() -> None:
    spec = make_spec(4, 2, pipeline=4)  # reference: (4, -, none, 2) -> rank 3 builds 2
    assert per_stage(spec, get_mtp_num_layers_to_build) == [0, 0, 0, 2]
    assert per_stage(spec, get_mtp_layer_offset) == [0, 0, 0, 0]
    assert per_stage(spec, get_decoder_layer_numbers) == [[1], [2], [3], [4]]


def test_no_layout_with_virtual_stages_uses_the_last_virtual_stage() -> None:
    spec = make_spec(8, 1, pipeline=4, virtual_pipeline=2)  # reference: (4, 2, none, 1)
    assert per_stage(spec, get_mtp_num_layers_to_build) == [0, 0, 0, 0, 0, 0, 0, 1]
    # Megatron's interleaving: rank r holds layers r+1 (vp 0) and r+5 (vp 1)
    assert per_stage(spec, get_decoder_layer_numbers) == [[1], [2], [3], [4],
                                                          [5], [6], [7], [8]]
    assert get_transformer_layer_offset(spec, 1, 2) == 6


def test_standalone_mtp_stage() -> None:
    spec = make_spec(8, 1, pipeline=4, layout="Etttt|tttt|m|L")  # reference: rank 2 builds 1
    assert per_stage(spec, get_mtp_num_layers_to_build) == [0, 0, 1, 0]
    assert per_stage(spec, get_mtp_layer_offset) == [0, 0, 0, 1]
    assert per_stage(spec, get_num_layers_to_build) == [4, 4, 0, 0]
    assert per_stage(spec, get_transformer_layer_offset) == [0, 4, 8, 8]
    plan = build_stage_plan(spec)
    assert [(e.embedding, e.loss, e.standalone_mtp) for e in plan.stages] == [
        (True, False, False), (False, False, False), (False, False, True), (False, True, False)]
    # the final norm stays with decoder layer 8 (h0 feeds the MTP stage)
    assert [e.final_layernorm for e in plan.stages] == [False, True, False, False]
    assert plan.stage(2).mtp_depths_in_loss == 0
    assert plan.stage(3).mtp_depths_in_loss == 1


def test_mtp_with_the_loss_on_the_last_virtual_stage() -> None:
    spec = make_spec(6, 1, pipeline=2, layout="Et|(tt|)*2tmL")
    assert spec.parallel.virtual_pipeline == 2
    assert per_stage(spec, get_mtp_num_layers_to_build) == [0, 0, 0, 1]
    assert per_stage(spec, get_decoder_layer_numbers) == [[1], [2, 3], [4, 5], [6]]
    last = build_stage_plan(spec).stage(1, 1)
    assert (last.loss, last.mtp_layers, last.standalone_mtp, last.final_layernorm) == (
        True, 1, False, True)


def test_mtp_on_the_first_ranks_last_virtual_stage_is_standalone() -> None:
    spec = make_spec(4, 2, pipeline=2, layout="Et|tt|tmm|L")
    assert get_mtp_num_layers_to_build(spec, 1, 0) == 2
    assert get_mtp_layer_offset(spec, 1, 1) == 2  # the loss stage comes after both
    entry = build_stage_plan(spec).stage(0, 1)
    assert entry.standalone_mtp and not entry.loss and entry.decoder_layers == (4,)


def test_deepseek_v3_layout() -> None:
    spec = make_spec(61, 1, pipeline=16, layout="Et|(tt|)*30mL")
    assert spec.parallel.virtual_pipeline == 2
    assert get_decoder_layer_numbers(spec, 0, 0) == [1]
    assert get_decoder_layer_numbers(spec, 1, 0) == [32, 33]  # stage 16 = (rank 0, vp 1)
    assert get_mtp_num_layers_to_build(spec, 1, 15) == 1
    assert sum(per_stage(spec, get_mtp_num_layers_to_build)) == 1


@pytest.mark.parametrize(("num_layers", "parallel", "expected"), [
    (10, {"pipeline": 4, "num_layers_in_first_pipeline_stage": 1,
          "num_layers_in_last_pipeline_stage": 3}, [1, 3, 3, 3]),
    (9, {"pipeline": 4, "num_layers_in_first_pipeline_stage": 3}, [3, 2, 2, 2]),
    (7, {"pipeline": 3, "num_layers_in_last_pipeline_stage": 1}, [3, 3, 1]),
    (4, {"pipeline": 2, "num_layers_in_first_pipeline_stage": 1,
         "num_layers_in_last_pipeline_stage": 3}, [1, 3]),
    (16, {"pipeline": 4, "virtual_pipeline": 2, "num_layers_in_first_pipeline_stage": 2,
          "num_layers_in_last_pipeline_stage": 2}, [1, 3, 3, 1, 1, 3, 3, 1]),
    (7, {"pipeline": 4, "account_for_embedding_in_pipeline_split": True}, [1, 2, 2, 2]),
    (6, {"pipeline": 4, "account_for_embedding_in_pipeline_split": True,
         "account_for_loss_in_pipeline_split": True}, [1, 2, 2, 1]),
    (14, {"pipeline": 2, "virtual_pipeline": 2, "account_for_embedding_in_pipeline_split": True,
          "account_for_loss_in_pipeline_split": True}, [3, 4, 4, 3]),
])
def test_split_without_a_layout(num_layers: int, parallel: dict, expected: list[int]) -> None:
    spec = make_spec(num_layers, 1, **parallel)
    assert per_stage(spec, get_num_layers_to_build) == expected
    offsets = per_stage(spec, get_transformer_layer_offset)
    assert offsets == [sum(expected[:i]) for i in range(len(expected))]
    assert per_stage(spec, get_mtp_num_layers_to_build)[-1] == 1


@pytest.mark.parametrize(("num_layers", "parallel", "key", "words"), [
    (6, {"pipeline": 4}, "parallel.pipeline", "does not divide evenly over pipeline 4"),
    (8, {"pipeline": 2, "virtual_pipeline": 3}, "parallel.virtual_pipeline",
     "do not divide evenly over virtual_pipeline 3"),
    (10, {"pipeline": 4, "num_layers_in_first_pipeline_stage": 1,
          "num_layers_in_last_pipeline_stage": 2}, "parallel.num_layers_in_first_pipeline_stage",
     "do not divide evenly over the 2 middle pipeline ranks"),
    (4, {"pipeline": 2, "num_layers_in_first_pipeline_stage": 1,
         "num_layers_in_last_pipeline_stage": 2}, "parallel.num_layers_in_first_pipeline_stage",
     "model.num_layers is 4"),
    (4, {"pipeline": 3, "num_layers_in_last_pipeline_stage": 5},
     "parallel.num_layers_in_last_pipeline_stage", "model.num_layers is 4"),
    (4, {"pipeline": 1, "num_layers_in_first_pipeline_stage": 4},
     "parallel.num_layers_in_first_pipeline_stage", "need parallel.pipeline > 1"),
    (4, {"pipeline": 2, "num_layers_in_first_pipeline_stage": 2,
         "account_for_embedding_in_pipeline_split": True},
     "parallel.account_for_embedding_in_pipeline_split", "cannot be combined"),
])
def test_split_errors_name_the_key(num_layers: int, parallel: dict, key: str, words: str) -> None:
    with pytest.raises(SpecError) as caught:
        make_spec(num_layers, 1, **parallel)
    (problem,) = caught.value.problems
    assert problem.key == key
    assert words in problem.message


def test_rank_arguments_are_checked() -> None:
    spec = make_spec(8, 1, pipeline=4, virtual_pipeline=2)
    with pytest.raises(ValueError, match="vp_stage must be passed"):
        get_mtp_num_layers_to_build(spec, None, 3)
    with pytest.raises(ValueError, match="pp_rank must be passed"):
        get_num_layers_to_build(spec, 0)
    with pytest.raises(ValueError, match="outside pipeline size"):
        get_num_layers_to_build(spec, 0, 4)
    # without a layout Megatron's MTP offset is 0 whatever the ranks: no rank needed
    assert get_mtp_layer_offset(spec) == 0
    # without virtual stages vp_stage is ignored; with pipeline 1 pp_rank defaults to 0
    assert get_mtp_num_layers_to_build(make_spec(4, 2, pipeline=2), 5, 1) == 2
    assert get_mtp_num_layers_to_build(make_spec(4, 2)) == 2


def test_virtual_stages_on_one_rank_number_layers_globally() -> None:
    # Megatron-Core numbers every virtual stage from layer 1 when pipeline == 1 (its offset
    # function returns 0 there); each layer must exist once, so the plan counts globally.
    spec = make_spec(4, 1, virtual_pipeline=2)
    assert per_stage(spec, get_decoder_layer_numbers) == [[1, 2], [3, 4]]
    assert per_stage(spec, get_mtp_num_layers_to_build) == [0, 1]
    layout = make_spec(3, 1, layout="Et|ttmL")
    assert layout.parallel.virtual_pipeline == 2
    assert per_stage(layout, get_decoder_layer_numbers) == [[1], [2, 3]]
    assert per_stage(layout, get_mtp_layer_offset) == [0, 0]
