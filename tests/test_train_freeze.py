"""`train.freeze`: parts, prefixes and globs by global name; frozen parameters get no gradient,
no optimizer state and keep their values (a frozen MoE router keeps its expert bias too)."""

from __future__ import annotations

import pytest
import torch

from mtp_cli import build_model, load_spec
from mtp_cli.config.freeze_rules import freeze_problem, is_frozen
from mtp_cli.data.batch import plain_batch
from mtp_cli.errors import SpecError, UserError
from mtp_cli.train.optim import build_optimizer
from mtp_cli.train.step import StepSettings, train_step
from tests.cli_helpers import SPECS

MAIN = "train.freeze=[embedding,decoder,output_layer]"


def test_entries_name_parts_prefixes_and_globs():
    assert is_frozen("decoder.layers.1.mlp.linear_fc1.weight", ["decoder"], tied=False)
    assert is_frozen("decoder.layers.1.mlp.linear_fc1.weight", ["decoder.layers.1"], tied=False)
    assert not is_frozen("decoder.layers.10.mlp.linear_fc1.weight", ["decoder.layers.1"],
                         tied=False)
    assert is_frozen("mtp.layers.0.transformer_layer.mlp.linear_fc2.weight",
                     ["*.mlp.*"], tied=False)
    assert not is_frozen("mtp.layers.0.eh_proj.weight", ["decoder", "output_layer"], tied=False)
    # a tied output layer (a pipeline loss stage's copy) is the embedding
    assert is_frozen("output_layer.weight", ["embedding"], tied=True)
    assert not is_frozen("output_layer.weight", ["embedding"], tied=False)


def test_bad_entries_are_spec_errors_at_train_freeze():
    assert "names no part" in freeze_problem(["decoders"], tied=False, mtp_layers=1)
    assert "no MTP layers" in freeze_problem(["mtp"], tied=False, mtp_layers=0)
    assert "is the word embedding" in freeze_problem(["output_layer"], tied=True, mtp_layers=1)
    assert freeze_problem(["output_layer", "embedding"], tied=True, mtp_layers=1) is None
    with pytest.raises(SpecError) as error:
        load_spec(SPECS / "tiny.yaml", ["train.freeze=[decoder, embeding]"])
    assert error.value.problems[0].key == "train.freeze"
    with pytest.raises(UserError, match="names no parameter"):
        build_model(load_spec(SPECS / "tiny.yaml", ["train.freeze=['decoder.layer.*']"]), "meta")
    with pytest.raises(UserError, match="every parameter is frozen"):
        build_model(load_spec(SPECS / "tiny.yaml", [MAIN.replace("]", ",mtp]")]), "meta")


def test_optimizer_holds_only_trainable_parameters():
    model = build_model(load_spec(SPECS / "tiny.yaml", [MAIN]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("mtp.") for name in trainable)
    optimizer = build_optimizer(model, load_spec(SPECS / "tiny.yaml").train)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for name, p in model.named_parameters() if name in trainable}


def test_steps_change_only_trainable_tensors_and_frozen_routers_keep_their_bias():
    spec = load_spec(SPECS / "tiny_moe.yaml", [MAIN, "model.hidden_size=32", "model.num_layers=2",
                                               "model.moe_layer_freq=[0,1]",
                                               "model.seq_length=16", "train.lr=1e-2"])
    model = build_model(spec).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, spec.train)
    settings = StepSettings(num_microbatches=1, per_token_loss=False, grad_clip=1.0,
                            bf16=False, device=torch.device("cpu"), dp_cp_size=1,
                            dp_cp_group=None)
    windows = torch.randint(0, spec.model.vocab_size, (2, 17),
                            generator=torch.Generator().manual_seed(0))
    train_step(model, optimizer, [plain_batch(windows)], settings)
    after = model.state_dict()
    for name, value in before.items():
        changed = not torch.equal(after[name], value)
        assert changed == name.startswith("mtp."), name
    assert set(optimizer.state) == {p for p in model.parameters() if p.requires_grad}
