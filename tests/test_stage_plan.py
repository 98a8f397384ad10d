"""Stage models built from the plan hold exactly the whole model's layers, under the same names."""

from __future__ import annotations

import pytest

from mtp_cli.builders.model_builder import build_model
from mtp_cli.plan.placement import build_stage_plan
from mtp_cli.plan.stages import Stage
from tests.placement_helpers import make_spec

WORD = "embedding.word_embeddings.weight"

CASES = {
    "standalone mtp, tied": dict(num_layers=8, depths=1, pipeline=4, layout="Etttt|tttt|m|L",
                                 model={"share_embeddings_and_output_weights": True}),
    "mtp with loss, virtual": dict(num_layers=6, depths=2, pipeline=2, layout="Et|(tt|)*2tmmL",
                                   model={"position_embedding": "learned_absolute"}),
    "no layout, tied": dict(num_layers=4, depths=2, pipeline=2,
                            model={"share_embeddings_and_output_weights": True}),
    "mtp on rank 0, untied": dict(num_layers=4, depths=1, pipeline=2, layout="Et|tt|tm|L"),
}


def shapes(module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


@pytest.mark.parametrize("case", CASES)
def test_stage_models_partition_the_whole_model(case: str) -> None:
    spec = make_spec(**CASES[case])
    tied = spec.model.share_embeddings_and_output_weights
    whole = shapes(build_model(spec, "meta"))
    plan = build_stage_plan(spec)
    seen: dict[str, int] = {}
    for entry in plan.stages:
        stage = shapes(build_model(spec, "meta", stage=entry))
        for name, shape in stage.items():
            # the loss stage's copy of a tied output weight has the word embedding's shape
            source = WORD if (tied and name == "output_layer.weight") else name
            assert whole[source] == shape, name
            seen[source] = seen.get(source, 0) + 1
        holds_embedding = entry.embedding or entry.mtp_layers > 0
        assert (WORD in stage) == holds_embedding
        assert ("output_layer.weight" in stage) == (entry.loss and not (tied and WORD in stage))
        layer_keys = {n.split(".")[2] for n in stage if n.startswith("decoder.layers.")}
        assert layer_keys == {str(k - 1) for k in entry.decoder_layers}
        mtp_keys = {n.split(".")[2] for n in stage if n.startswith("mtp.layers.")}
        first = entry.mtp_layer_offset
        assert mtp_keys == {str(first + i) for i in range(entry.mtp_layers)}
    assert set(seen) == set(whole)  # nothing lost
    for name, count in seen.items():
        if name.startswith(("decoder.", "mtp.")):
            assert count == 1, name  # layers and the final norm live on exactly one stage


def test_stage_layers_keep_their_global_layer_numbers() -> None:
    spec = make_spec(**CASES["mtp with loss, virtual"])
    plan = build_stage_plan(spec)
    contents = plan.stage(0, 1)  # stage 2: decoder layers 4 and 5
    model = build_model(spec, "meta", stage=contents)
    assert [layer.layer_number for layer in model.decoder.layers.values()] == [4, 5]
    last = build_model(spec, "meta", stage=plan.stage(1, 1))
    assert [layer.layer_number for layer in last.mtp.layers.values()] == [1, 2]
    # the MTP transformer layers are numbered after the decoder's (N + k)
    assert [layer.transformer_layer.layer_number for layer in last.mtp.layers.values()] == [7, 8]
    assert last.stage.mtp_depths_in_loss == 2 and last.decoder.final_layernorm is not None


def test_one_stage_plan_is_the_whole_model() -> None:
    spec = make_spec(4, 2)
    (entry,) = build_stage_plan(spec).stages
    assert entry.vp_stage is None
    assert entry == Stage.whole_model(spec.model.num_layers, 2)


def test_standalone_stage_holds_an_embedding_copy_and_no_output_layer() -> None:
    spec = make_spec(**CASES["standalone mtp, tied"])
    plan = build_stage_plan(spec)
    mtp_stage = build_model(spec, "meta", stage=plan.stage(2))
    assert mtp_stage.output_layer is None and mtp_stage.embedding is not None
    assert mtp_stage.decoder.final_layernorm is None and mtp_stage.stage.mtp_depths_in_loss == 0
    loss_stage = build_model(spec, "meta", stage=plan.stage(3))
    assert loss_stage.embedding is None and loss_stage.output_layer is not None
    assert tuple(loss_stage.output_weight().shape) == (64, 16)
