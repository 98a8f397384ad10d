"""`mtp import` of what people have: a config.json that declares MTP depths its files lack
(what `save_pretrained` and fine-tuning tools write), MTP depths grafted from the base model
(`--mtp-from`), and an export's training settings kept through export -> import
(`mtp_cli_training.json`, read as untrusted input). CPU, fp32, random weights, no download."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mtp_cli import build_model, load_spec
from mtp_cli.errors import UserError
from mtp_cli.hf.export import export_checkpoint
from mtp_cli.hf.importer import import_model, load_hf_model_state
from mtp_cli.hf.training_record import RECORD
from mtp_cli.inspect.checkpoint import open_checkpoint
from tests.ckpt_helpers import write_dcp_checkpoint
from tests.cli_helpers import run_mtp
from tests.hf_models import (
    dense_sections,
    imported_model,
    llama_config,
    random_model,
    saved_model,
    transformers_pair,
)
from tests.hf_parity import deepseek_config, our_depth_logits

pytest.importorskip("transformers")


def _checkpoint_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = open_checkpoint(run_dir)
    return checkpoint.read(list(checkpoint.tensors))


def _nothing_written(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(out.name + ".tmp-*"))


def test_declared_but_absent_depths_import_the_main_model_with_fresh_depths(tmp_path):
    # save_pretrained of a DeepSeek-V3 model: config.json says num_nextn_predict_layers 2, the
    # files hold the main model only (transformers keeps MTP layers in a separate MtpModel)
    config = deepseek_config(num_mtp_layers=2, num_nextn_predict_layers=2)
    main, _ = transformers_pair(config, 3)
    hf_dir = tmp_path / "hf"
    main.save_pretrained(hf_dir)
    assert json.loads((hf_dir / "config.json").read_text())["num_nextn_predict_layers"] == 2
    result = run_mtp("import", str(hf_dir), "--out", str(tmp_path / "run"),
                     "model.seq_length=16", "train.seed=11")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "initialised fresh" in line]
    assert len(lines) == 1 and "declares 2" in lines[0] and "depths 1, 2" in lines[0], \
        result.stdout
    spec, ours = imported_model(tmp_path / "run")
    assert spec.mtp.num_layers == 2
    fresh = build_model(spec).state_dict()  # Megatron's init by name (train.seed=11)
    state = ours.state_dict()
    depth_names = [name for name in state if name.startswith("mtp.")]
    assert depth_names
    for name in depth_names:
        assert torch.equal(state[name], fresh[name]), name
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = main(ids).logits
    torch.testing.assert_close(our_depth_logits(ours, ids)[0], theirs, atol=1e-5, rtol=0)
    # `mtp generate` / `mtp eval` of the directory: the model its files hold, no random drafts
    loaded, state, notes = load_hf_model_state(hf_dir)
    assert loaded.mtp.num_layers == 0 and not any(name.startswith("mtp.") for name in state)
    assert notes == ["config.json declares 2 MTP depths, the weight files hold 0: loaded with "
                     "those"]


def _finetuned_and_base(tmp_path: Path, **base_config):
    """A base model with 2 MTP depths, and a 'fine-tune' of it (other weights) without any."""
    base_dir, _, base_mtp = saved_model(tmp_path / "base", llama_config(num_mtp_layers=2,
                                                                        **base_config))
    tuned, _ = transformers_pair(llama_config(num_mtp_layers=0), 21)
    tuned_dir = tmp_path / "tuned"
    tuned.save_pretrained(tuned_dir, max_shard_size="40KB")
    return base_dir, base_mtp, tuned_dir


def test_mtp_from_grafts_the_base_depths_bit_for_bit(tmp_path):
    base_dir, base_mtp, tuned_dir = _finetuned_and_base(tmp_path)
    result = import_model(tuned_dir, tmp_path / "run", ["model.seq_length=16"],
                          mtp_from=base_dir)
    assert result.fresh == [] and any("grafted from" in note for note in result.notes)
    import_model(base_dir, tmp_path / "base_run", ["model.seq_length=16"])
    import_model(tuned_dir, tmp_path / "tuned_run", ["model.seq_length=16"])
    grafted = _checkpoint_tensors(tmp_path / "run")
    base, tuned = _checkpoint_tensors(tmp_path / "base_run"), _checkpoint_tensors(tmp_path /
                                                                                 "tuned_run")
    assert sorted(grafted) == sorted(base)  # the same model, the depths included
    for name, tensor in grafted.items():
        reference = base[name] if name.startswith("mtp.") else tuned[name]
        assert tensor.dtype == reference.dtype and torch.equal(tensor, reference), name
    assert any(not torch.equal(base[n], tuned[n]) for n in tuned)  # a different main model
    depth = base_mtp.layers[1]  # straight from transformers' module, not through an import
    assert torch.equal(grafted["mtp.layers.1.eh_proj.weight"], depth.eh_proj.weight)
    assert torch.equal(grafted["mtp.layers.1.final_layernorm.weight"], depth.post_norm.weight)
    assert load_spec(tmp_path / "run" / "spec.yaml").mtp.num_layers == 2
    # more depths than the base has: the rest start from Megatron's init
    extra = import_model(tuned_dir, tmp_path / "run3", ["mtp.num_layers=3"], mtp_from=base_dir)
    assert extra.fresh and all(name.startswith("mtp.layers.2.") for name in extra.fresh)


def test_mtp_from_a_model_of_other_dimensions_exits_2_naming_both_shapes(tmp_path):
    base_dir, _, tuned_dir = _finetuned_and_base(tmp_path, intermediate_size=40)
    out = tmp_path / "run"
    result = run_mtp("import", str(tuned_dir), "--out", str(out), "--mtp-from", str(base_dir))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "model.layers.2.mlp.gate_proj.weight is [40, 32]" in result.stderr, result.stderr
    assert "needs [48, 32]" in result.stderr and str(base_dir) in result.stderr
    assert _nothing_written(out)
    qwen_dir, _, _ = saved_model(tmp_path / "qwen", llama_config(num_mtp_layers=1,
                                                                 num_attention_heads=2))
    with pytest.raises(UserError, match="num_attention_heads 2, the imported model 4"):
        import_model(tuned_dir, out, mtp_from=qwen_dir)
    plain, _ = transformers_pair(llama_config(num_mtp_layers=0), 2)
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(UserError, match="declares no MTP depths"):
        import_model(tuned_dir, out, mtp_from=tmp_path / "plain")
    assert _nothing_written(out)


TRAINED = {"train": {"global_batch_size": 16, "micro_batch_size": 4, "lr": 1e-3, "seed": 9,
                     "steps": 30, "freeze": ["embedding"]},
           "mtp": {"loss_scaling_factor": [{"until_tokens": 1000.0, "value": 0.3},
                                           {"value": 0.1}], "detach_heads": True}}


def _exported_run(tmp_path: Path) -> tuple[object, Path]:
    sections = dense_sections(seq_length=16, max_position_embeddings=64)
    sections.update(json.loads(json.dumps(TRAINED)))
    spec, model = random_model(sections, 5)
    write_dcp_checkpoint(tmp_path / "trained", spec, model_state=model.state_dict())
    export_checkpoint(tmp_path / "trained", tmp_path / "hf")
    return spec, tmp_path / "hf"


def test_export_then_import_keeps_the_train_and_mtp_settings(tmp_path):
    spec, hf_dir = _exported_run(tmp_path)
    assert os.stat(hf_dir / RECORD).st_mode & 0o777 == 0o644 & ~_umask()
    result = import_model(hf_dir, tmp_path / "run")
    assert not any("defaults" in note for note in result.notes), result.notes
    back = load_spec(tmp_path / "run" / "spec.yaml")
    assert back.train == spec.train and back.mtp == spec.mtp  # 16 x 16 tokens, 0.3 then 0.1
    assert back.model.seq_length == 16 and back.model.max_position_embeddings == 64
    overridden = import_model(hf_dir, tmp_path / "run2", ["train.lr=0.01"])
    again = load_spec(tmp_path / "run2" / "spec.yaml")
    assert again.train.lr == 0.01 and again.train.global_batch_size == 16
    assert overridden.notes == result.notes
    (hf_dir / RECORD).unlink()  # a directory mtp export did not write: the defaults, said once
    plain = import_model(hf_dir, tmp_path / "run3", ["train.lr=0.01"])
    said = [note for note in plain.notes if RECORD in note]
    assert len(said) == 1 and "train.global_batch_size=8" in said[0], plain.notes
    assert "mtp.loss_scaling_factor=0.1" in said[0] and "train.lr" not in said[0]
    assert load_spec(tmp_path / "run3" / "spec.yaml").model.seq_length == 64


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("content, message", [
    ("{not json", "does not parse as JSON"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ('{"format": "mtp-cli training settings v1"}', "Field required"),
    ("BIG", "more than the 262144 bytes"),
    ("DEEP", "nested too deeply"),
    ("EXTRA", "Extra inputs are not permitted"),
    ("NAN", "finite number"),
    ("MODULE", "Extra inputs are not permitted"),
])
def test_a_hostile_training_record_is_refused_naming_it(tmp_path, content, message):
    _, hf_dir = _exported_run(tmp_path)
    path = hf_dir / RECORD
    record = json.loads(path.read_text())
    if content == "BIG":
        content = json.dumps({**record, "pad": "x" * 300_000})
    elif content == "DEEP":
        content = "[" * 100_000 + "]" * 100_000
    elif content == "EXTRA":
        record["train"]["run_this"] = "rm -rf /"
        content = json.dumps(record)
    elif content == "NAN":
        record["train"]["lr"] = float("nan")
        content = json.dumps(record)
    elif content == "MODULE":  # only the train/mtp sections and model.seq_length, nothing else
        record["model"]["modules"] = {"decoder": "import:os:system"}
        content = json.dumps(record)
    path.write_text(content)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=message) as error:
        import_model(hf_dir, out)
    assert error.value.problems[0].file == str(path)
    assert _nothing_written(out)
