"""`mtp import` of transformers models (CPU, fp32, random weights, no download).

Each architecture is built at random, saved with `save_pretrained` (sharded), its MTP depths
written at `model.layers.{N+k}` (`tests.hf_models.write_mtp_layers`), imported: mtp-cli's main
and per-depth logits equal transformers' (`MtpModel`) to 1e-5, and exporting the step-0 import
gives back the original safetensors tensors bit for bit (names, shapes, values, dtypes; a
DeepSeek-V3 checkpoint with `rope_interleave: false` comes back in the interleaved rotary layout
mtp-cli computes in, with `rope_interleave: true`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtp_cli import build_model, load_spec
from mtp_cli.errors import UserError
from mtp_cli.hf.export import export_checkpoint
from mtp_cli.hf.importer import import_model
from mtp_cli.inspect.checkpoint import open_checkpoint
from tests.hf_models import (
    imported_model,
    llama_config,
    qwen2_config,
    read_safetensors_dir,
    saved_model,
)
from tests.hf_parity import (
    ParityPair,
    deepseek_config,
    glm_config,
    hf_depth_logits,
    our_depth_logits,
)

pytest.importorskip("transformers")
CASES = {
    "llama": lambda: llama_config(),
    "llama_all_biases": lambda: llama_config(attention_bias=True, mlp_bias=True,
                                             num_mtp_layers=1),
    "qwen2_tied": lambda: qwen2_config(),
    "deepseek_v3": lambda: deepseek_config(num_mtp_layers=2),
    "deepseek_v3_rope_not_interleaved": lambda: deepseek_config(num_mtp_layers=1,
                                                                rope_interleave=False),
    "glm4_moe": lambda: glm_config(),
}


SLOW_CASES = {"llama_all_biases", "deepseek_v3_rope_not_interleaved", "glm4_moe"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES
                                  else c for c in CASES])
def test_import_matches_transformers_and_exports_back_bit_for_bit(case, tmp_path):
    config = CASES[case]()
    hf_dir, main, mtp = saved_model(tmp_path, config)
    assert len(list(hf_dir.glob("model-*.safetensors"))) > 2  # sharded
    run = tmp_path / "run"
    result = import_model(hf_dir, run, ["model.seq_length=16"])
    assert result.fresh == [] and result.architecture == config.architectures[0] \
        if config.architectures else True
    spec, ours = imported_model(run)
    assert spec.mtp.num_layers == len(mtp.layers)
    assert spec.model.share_embeddings_and_output_weights == config.tie_word_embeddings
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    theirs = hf_depth_logits(ParityPair(main, mtp, ours), ids)
    mine = our_depth_logits(ours, ids)
    for depth, (a, b) in enumerate(zip(theirs, mine, strict=True)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=f"depth {depth}")
    exported = tmp_path / "exported"
    export_checkpoint(run, exported, shard_size="40KB", target="transformers")
    original, back = read_safetensors_dir(hf_dir), read_safetensors_dir(exported)
    assert sorted(original) == sorted(back)
    permuted = ("q_b_proj.weight", "kv_a_proj_with_mqa.weight")  # rotary rows (see below)
    for name, tensor in original.items():
        if getattr(config, "rope_interleave", True) or not name.endswith(permuted):
            assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    if not getattr(config, "rope_interleave", True):
        # mtp-cli rotates adjacent pairs, as Megatron does: the export says rope_interleave:
        # true and holds those rows in that order; transformers computes the same logits
        from transformers import AutoModelForCausalLM

        again = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager")
        assert again.config.rope_interleave
        with torch.no_grad():
            torch.testing.assert_close(again.eval()(ids).logits, theirs[0], atol=1e-5, rtol=0)


def test_bf16_import_keeps_the_dtype_and_exports_back_bit_for_bit(tmp_path):
    hf_dir, _, _ = saved_model(tmp_path, llama_config(num_mtp_layers=1), dtype=torch.bfloat16)
    import_model(hf_dir, tmp_path / "run")
    checkpoint = open_checkpoint(tmp_path / "run")
    assert {info.dtype for info in checkpoint.tensors.values()} == {"bfloat16"}
    export_checkpoint(tmp_path / "run", tmp_path / "back", target="transformers")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"
    original, back = read_safetensors_dir(hf_dir), read_safetensors_dir(tmp_path / "back")
    assert sorted(original) == sorted(back)
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], v)
               for k, v in original.items())


def test_extra_depths_start_from_megatron_init_by_name(tmp_path):
    hf_dir, _, mtp = saved_model(tmp_path, llama_config(num_mtp_layers=1))
    result = import_model(hf_dir, tmp_path / "run", ["mtp.num_layers=3", "train.seed=7"])
    assert len({name.split(".")[2] for name in result.fresh}) == 2  # depths 2 and 3
    assert any("initialised fresh" in note for note in result.notes)
    spec, ours = imported_model(tmp_path / "run")
    fresh = build_model(spec).state_dict()  # Megatron's init by name (train.seed=7)
    state = ours.state_dict()
    for name in state:
        if name.startswith(("mtp.layers.1.", "mtp.layers.2.")):
            assert torch.equal(state[name], fresh[name]), name
    reference = mtp.layers[0].eh_proj.weight
    assert torch.equal(state["mtp.layers.0.eh_proj.weight"], reference)  # depth 1 imported


def test_fewer_depths_import_the_first_and_say_so(tmp_path):
    hf_dir, _, mtp = saved_model(tmp_path, llama_config(num_mtp_layers=2))
    result = import_model(hf_dir, tmp_path / "run", ["mtp.num_layers=1"])
    assert any("not imported" in note for note in result.notes)
    _, ours = imported_model(tmp_path / "run")
    assert torch.equal(ours.state_dict()["mtp.layers.0.hnorm.weight"], mtp.layers[0].hnorm.weight)


def test_tied_model_stays_tied_in_a_checkpoint_mtp_train_resolves(tmp_path):
    from mtp_cli.checkpoint.run_dir import RunDir
    from mtp_cli.inspect import inspect_checkpoint

    hf_dir, _, _ = saved_model(tmp_path, qwen2_config(num_mtp_layers=1))
    assert "lm_head.weight" not in read_safetensors_dir(hf_dir)
    import_model(hf_dir, tmp_path / "run", ["checkpoint.checksums=true"])
    checkpoint = open_checkpoint(tmp_path / "run")
    assert "output_layer.weight" not in checkpoint.tensors
    assert load_spec(tmp_path / "run" / "spec.yaml").model.share_embeddings_and_output_weights
    resolution = RunDir(tmp_path / "run").resolve()  # what a resume validates (checksums too)
    assert resolution.step == 0 and not resolution.warnings
    assert resolution.checkpoint.meta.checksums is not None
    report = inspect_checkpoint(tmp_path / "run")
    assert report.passed, [c.as_dict() for c in report.checks if not c.passed]


def _assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(out.name + ".tmp-")]


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_bad_input_names_the_file_and_writes_nothing(tmp_path):
    hf_dir, _, _ = saved_model(tmp_path, llama_config(num_mtp_layers=1))
    out = tmp_path / "run"
    config = hf_dir / "config.json"
    original = config.read_text()
    cases = [
        (lambda: _edit_json(config, model_type="gpt2", architectures=["GPT2LMHeadModel"]),
         "unknown architecture", config),
        (lambda: _edit_json(config, num_hidden_layers=4), "describes tensors no weight file",
         config),  # decoder layer 3 held by no file (a declared MTP depth may be absent)
        (lambda: _edit_json(config, num_hidden_layers=3), "does not account for", None),
        (lambda: _edit_json(config, intermediate_size=40), "but config.json gives", None),
        (lambda: _edit_json(config, num_nextn_predict_layers=0), "does not account for", None),
    ]
    for edit, message, named in cases:
        config.write_text(original)
        edit()
        with pytest.raises(UserError, match=message) as error:
            import_model(hf_dir, out)
        where = error.value.problems[0].file
        assert where is not None and Path(where).parent == hf_dir
        if named is not None:
            assert Path(where) == named
        _assert_nothing_written(tmp_path, out)
    config.write_text(original)
    shards = sorted(hf_dir.glob("model-0*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:-64])  # truncated
    with pytest.raises(UserError, match="not a complete safetensors file") as error:
        import_model(hf_dir, out)
    assert error.value.problems[0].file == str(shards[1])
    shards[1].unlink()  # missing
    with pytest.raises(UserError, match="missing") as error:
        import_model(hf_dir, out)
    assert error.value.problems[0].file == str(shards[1])
    _assert_nothing_written(tmp_path, out)
    shards[1].write_bytes(data)
    out.mkdir()
    with pytest.raises(UserError, match="already exists") as error:
        import_model(hf_dir, out)
    assert error.value.problems[0].file == str(out) and "--overwrite" in error.value.render()
    assert list(out.iterdir()) == []
    for target in (hf_dir, tmp_path):  # --overwrite never replaces the input
        with pytest.raises(UserError, match="is or holds the input"):
            import_model(hf_dir, target, overwrite=True)
    assert (hf_dir / "config.json").read_text() == original


def test_differing_mtp_copy_is_refused_naming_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_dir, _, _ = saved_model(tmp_path, llama_config(num_mtp_layers=1))
    path = hf_dir / "model-mtp.safetensors"
    tensors = load_file(path)
    tensors["model.layers.2.shared_head.head.weight"][0, 0] += 1.0
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"model\.layers\.2\.shared_head\.head\.weight differs "
                                        r"from lm_head\.weight") as error:
        import_model(hf_dir, tmp_path / "run")
    assert error.value.problems[0].file == str(path)
    _assert_nothing_written(tmp_path, tmp_path / "run")


def test_fp8_checkpoint_is_refused_with_the_reason(tmp_path):
    from safetensors.torch import save_file

    hf_dir, _, _ = saved_model(tmp_path, llama_config(num_mtp_layers=0))
    path = hf_dir / "model-mtp.safetensors"
    save_file({"model.layers.0.mlp.down_proj.weight_scale_inv": torch.ones(1, 1)}, str(path))
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.down_proj.weight_scale_inv"] = path.name
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="FP8 block-quantized") as error:
        import_model(hf_dir, tmp_path / "run")
    assert error.value.problems[0].file == str(path)
    assert "dequantize" in (error.value.problems[0].hint or "")


def test_auto_map_code_is_never_run_and_bin_files_load_weights_only(tmp_path):
    hf_dir, main, _ = saved_model(tmp_path, llama_config(num_mtp_layers=0))
    marker = tmp_path / "ran"
    (hf_dir / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    _edit_json(hf_dir / "config.json", auto_map={"AutoModelForCausalLM":
                                                 "modeling_evil.EvilForCausalLM"})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((hf_dir / "config.json").read_text())
    torch.save(main.state_dict(), bin_dir / "pytorch_model.bin")
    import_model(bin_dir, tmp_path / "run")
    assert not marker.exists()
    _, ours = imported_model(tmp_path / "run")
    ids = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), main(ids).logits, atol=1e-5, rtol=0)

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model.embed_tokens.weight": Payload()}, bin_dir / "pytorch_model.bin")
    with pytest.raises(UserError, match="weights_only") as error:
        import_model(bin_dir, tmp_path / "run2")
    assert error.value.problems[0].file == str(bin_dir / "pytorch_model.bin")
    assert not marker.exists()
