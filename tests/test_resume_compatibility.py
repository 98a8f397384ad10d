"""Whether a checkpoint can resume a spec (`train.compatibility.plan_resume`, what `mtp train`
checks before launching): a changed model or `modules` tree is refused naming the parameters
that differ; a changed global batch is refused and never falls back to an older checkpoint; a
changed learning-rate schedule is said in one line."""

from __future__ import annotations

import copy
import json

import pytest

from mtp_cli import build_model, load_spec
from mtp_cli.builders.module_trees import resolved_module_trees
from mtp_cli.checkpoint.run_dir import RunDir
from mtp_cli.errors import UserError
from mtp_cli.train.compatibility import plan_resume
from mtp_cli.train.optim import lr_at
from tests.ckpt_helpers import tiny_spec, write_dcp_checkpoint


def with_identity_norm(spec):
    """`spec` with every decoder layer's pre-MLP norm replaced by IdentityOp."""
    data = spec.model_dump(mode="json")
    trees = copy.deepcopy(resolved_module_trees(spec))
    trees["decoder_layer"]["submodules"]["pre_mlp_layernorm"] = {"module": "IdentityOp"}
    data["modules"] = {"decoder_layer": trees["decoder_layer"]}
    return load_spec(data)


@pytest.fixture
def spec():
    return tiny_spec(mtp={"num_layers": 1})


def test_the_same_spec_resumes(tmp_path, spec):
    write_dcp_checkpoint(tmp_path, spec, step=10)
    plan = plan_resume(spec, RunDir(tmp_path))
    assert plan.step == 10 and plan.warnings == [] and plan.schedule_note is None


def test_a_norm_replaced_by_identity_is_refused_naming_the_dropped_weights(tmp_path, spec):
    write_dcp_checkpoint(tmp_path, spec, step=10)
    with pytest.raises(UserError) as raised:
        plan_resume(with_identity_norm(spec), RunDir(tmp_path))
    text = raised.value.render()
    assert "modules differs from the checkpoint" in text and "--overwrite" in text
    assert ("the checkpoint stores parameters the new model lacks: "
            "decoder.layers.0.pre_mlp_layernorm.bias, decoder.layers.0.pre_mlp_layernorm.weight, "
            "decoder.layers.1.pre_mlp_layernorm.bias, decoder.layers.1.pre_mlp_layernorm.weight"
            ) in text


def test_the_reverse_change_names_the_weights_the_checkpoint_lacks(tmp_path, spec):
    identity = with_identity_norm(spec)
    write_dcp_checkpoint(tmp_path, identity, step=10)
    with pytest.raises(UserError) as raised:
        plan_resume(spec, RunDir(tmp_path))
    assert "the new model has parameters the checkpoint lacks: " \
           "decoder.layers.0.pre_mlp_layernorm.bias" in raised.value.render()


def test_weights_of_another_shape_are_named_even_when_the_stored_spec_agrees(tmp_path, spec):
    wider = tiny_spec(mtp={"num_layers": 1}, model={"ffn_hidden_size": 128})
    write_dcp_checkpoint(tmp_path, spec, step=10, model_state=build_model(wider).state_dict())
    with pytest.raises(UserError) as raised:
        plan_resume(spec, RunDir(tmp_path))
    text = raised.value.render()
    assert "the model differs from the checkpoint" in text
    assert "parameter shapes changed: decoder.layers.0.mlp.linear_fc1.bias [128] -> [64]" in text


def test_a_model_change_never_falls_back_to_an_older_checkpoint(tmp_path, spec):
    write_dcp_checkpoint(tmp_path, spec, step=4)
    wider = tiny_spec(mtp={"num_layers": 1}, model={"hidden_size": 64})
    write_dcp_checkpoint(tmp_path, wider, step=8)
    with pytest.raises(UserError, match="model differs from the checkpoint"):
        plan_resume(spec, RunDir(tmp_path))


def test_a_global_batch_change_is_refused(tmp_path, spec):
    write_dcp_checkpoint(tmp_path, spec, step=10)
    bigger = tiny_spec(mtp={"num_layers": 1}, train={"global_batch_size": 16})
    with pytest.raises(UserError, match="global batches of 8"):
        plan_resume(bigger, RunDir(tmp_path))


def test_a_meta_json_without_a_spec_is_refused(tmp_path, spec):
    checkpoint = write_dcp_checkpoint(tmp_path, spec, step=10)
    (checkpoint / "meta.json").write_text(json.dumps({"step": 10}))
    with pytest.raises(UserError, match="stores no spec"):
        plan_resume(spec, RunDir(tmp_path))


def test_a_changed_schedule_is_said_in_one_line(tmp_path):
    old = tiny_spec(mtp={"num_layers": 1}, train={"steps": 300, "warmup_steps": 20,
                                                  "lr": 3e-3, "min_lr": 3e-4})
    write_dcp_checkpoint(tmp_path, old, step=300)
    longer = tiny_spec(mtp={"num_layers": 1}, train={"steps": 600, "warmup_steps": 20,
                                                     "lr": 3e-3, "min_lr": 3e-4})
    note = plan_resume(longer, RunDir(tmp_path)).schedule_note
    assert note is not None and "\n" not in note
    assert "train.steps 300 -> 600, train.decay_steps 300 -> 600" in note
    assert f"step 301 uses lr {lr_at(300, longer.train):.4g}" in note
    assert f"(the checkpoint's schedule: {lr_at(300, old.train):.4g})" in note
    assert lr_at(300, old.train) == pytest.approx(3e-4)
    kept = tiny_spec(mtp={"num_layers": 1}, train={"steps": 600, "decay_steps": 300,
                                                   "warmup_steps": 20, "lr": 3e-3,
                                                   "min_lr": 3e-4})
    note = plan_resume(kept, RunDir(tmp_path)).schedule_note
    assert note is not None and "train.decay_steps" not in note
    assert "step 301 uses lr 0.0003 (the checkpoint's schedule: 0.0003)" in note
