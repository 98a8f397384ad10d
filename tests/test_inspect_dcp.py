"""`mtp inspect-ckpt` on DCP checkpoints in the run-directory layout of CONTRACTS.md.

The checkpoints are real DCP saves of real models (`torch.distributed.checkpoint.save`, no
process group), laid out as `mtp train` writes them; see `tests/ckpt_helpers.py`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from mtp_cli import build_model
from mtp_cli.inspect import inspect_checkpoint, open_checkpoint
from tests.ckpt_helpers import rewrite_dcp, tiny_spec, write_dcp_checkpoint
from tests.inspect_fixtures import check, invoke, invoke_json

CONFIGS = {
    "d1_untied": {"mtp": {"num_layers": 1}},
    "d2_tied": {"mtp": {"num_layers": 2},
                "model": {"share_embeddings_and_output_weights": True}},
    "d2_repeated": {"mtp": {"num_layers": 2, "use_repeated_layer": True}},
    "d0": {"mtp": {"num_layers": 0}},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run directory per configuration, each with one complete checkpoint."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, sections in CONFIGS.items():
        spec = tiny_spec(**sections)
        write_dcp_checkpoint(root / name, spec, step=10, tokens=2560)
        out[name] = (root / name, spec)
    return out


def _ckpt(run_dir):
    return run_dir / "checkpoints" / "step_0000010"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_strict_passes_on_each_configuration(runs, name):
    run_dir, spec = runs[name]
    code, out = invoke_json("inspect-ckpt", run_dir, "--strict")
    assert code == 0, out["checks"]
    assert out["format"] == "dcp" and out["path"] == str(_ckpt(run_dir))
    assert (out["step"], out["tokens"]) == (10, 2560)
    assert out["losses"]["lm_loss"] == 3.25
    assert out["spec_source"] == "meta.json"
    assert out["layout"]["mtp_depths"] == spec.mtp.num_layers
    unique = sum(p.numel() for p in build_model(spec, "meta").parameters())
    assert out["parameters"]["stored"] == out["parameters"]["expected"] == unique
    names = [c["name"] for c in out["checks"]]
    tied = spec.model.share_embeddings_and_output_weights
    assert names == ["mtp_depths", "shapes", "mtp_ties", *(["output_tie"] if tied else []),
                     "finite"]  # --strict reads every weight too


def test_parts_and_other_sections(runs):
    run_dir, spec = runs["d2_tied"]
    report = inspect_checkpoint(run_dir)
    parts = {p.key: p for p in report.parts}
    assert list(parts) == ["embedding", "decoder", "mtp_1", "mtp_2"]  # tied: no output layer
    model = build_model(spec, "meta")
    assert parts["embedding"].parameters == sum(p.numel() for p in model.embedding.parameters())
    assert parts["mtp_2"].parameters == \
        sum(p.numel() for p in model.mtp.layers["1"].parameters())
    assert parts["mtp_1"].label == "mtp depth 1 (mtp.layers.0)"
    sections = {s["section"]: s for s in report.sections()}
    assert sections["optimizer"]["tensors"] == 3 and sections["trainer"]["values"] == 2
    assert sections["rng"]["tensors"] == 1
    assert check(report.as_dict(), "output_tie")["reason"].startswith("output layer tied")


def test_repeated_layer_stores_one_layer(runs):
    run_dir, _ = runs["d2_repeated"]
    out = inspect_checkpoint(run_dir).as_dict()
    assert out["layout"]["mtp_depths_present"] == ["mtp.layers.0"]
    assert "applied at all 2 depths" in check(out, "mtp_depths")["reason"]


def test_values_read_from_dcp_equal_the_saved_model(tmp_path):
    spec = tiny_spec()
    model = build_model(spec, "cpu")
    state = model.state_dict()
    ckpt = write_dcp_checkpoint(tmp_path / "run", spec, model_state=state)
    names = ["embedding.word_embeddings.weight", "mtp.layers.1.eh_proj.weight"]
    loaded = open_checkpoint(ckpt).read(names)
    for name in names:
        assert torch.equal(loaded[name], state[name])


def test_removed_depth_fails_and_is_named(runs, tmp_path):
    src = _ckpt(runs["d2_tied"][0])

    def drop_first_depth(model):
        for name in [n for n in model if n.startswith("mtp.layers.0.")]:
            del model[name]

    rewrite_dcp(src, tmp_path / "ckpt", drop_first_depth)
    result = invoke("inspect-ckpt", tmp_path / "ckpt", "--strict")
    assert result.exit_code == 1
    assert "missing mtp.layers.0" in result.stdout
    out = inspect_checkpoint(tmp_path / "ckpt").as_dict()
    assert check(out, "mtp_depths")["tensors"] == ["mtp.layers.0"]
    assert "mtp.layers.0.eh_proj.weight" in check(out, "shapes")["tensors"]


def test_extra_depth_with_repeated_layer_fails(runs, tmp_path):
    src = _ckpt(runs["d2_repeated"][0])

    def add_second_layer(model):
        for name in [n for n in model if n.startswith("mtp.layers.0.")]:
            model[name.replace("mtp.layers.0.", "mtp.layers.1.")] = model[name].clone()

    rewrite_dcp(src, tmp_path / "ckpt", add_second_layer)
    out = inspect_checkpoint(tmp_path / "ckpt").as_dict()
    depths = check(out, "mtp_depths")
    assert not depths["passed"] and depths["tensors"] == ["mtp.layers.1"]
    assert "unexpected mtp.layers.1" in depths["reason"]


@pytest.mark.parametrize("config,copy,main", [
    ("d1_untied", "mtp.layers.0.embedding.word_embeddings.weight",
     "embedding.word_embeddings.weight"),
    ("d2_tied", "mtp.layers.1.output_layer.weight", "embedding.word_embeddings.weight"),
])
def test_mtp_copies_equal_pass_differing_fail(runs, tmp_path, config, copy, main):
    src = _ckpt(runs[config][0])
    rewrite_dcp(src, tmp_path / "equal", lambda m: m.__setitem__(copy, m[main].clone()))
    code, out = invoke_json("inspect-ckpt", tmp_path / "equal", "--strict")
    assert code == 0 and copy in check(out, "mtp_ties")["note"]

    def differing(model):
        model[copy] = model[main].clone()
        model[copy][1, 2] += 0.25

    rewrite_dcp(src, tmp_path / "differs", differing)
    code, out = invoke_json("inspect-ckpt", tmp_path / "differs", "--strict")
    assert code == 1
    ties = check(out, "mtp_ties")
    assert ties["tensors"] == [copy]
    assert ties["details"][0]["max_abs_diff"] == pytest.approx(0.25, abs=1e-6)
    assert f"{copy} differs from {main}: max abs difference 0.25" in ties["reason"]


def test_tied_output_stored_twice_and_differing_fails(runs, tmp_path):
    src = _ckpt(runs["d2_tied"][0])

    def untie(model):
        model["output_layer.weight"] = model["embedding.word_embeddings.weight"] * 2

    rewrite_dcp(src, tmp_path / "ckpt", untie)
    out = inspect_checkpoint(tmp_path / "ckpt").as_dict()
    assert not check(out, "output_tie")["passed"]
    assert check(out, "shapes")["passed"]  # the tie check owns this tensor


@pytest.mark.parametrize("name,shape", [
    ("mtp.layers.1.eh_proj.weight", (32, 60)),
    ("decoder.layers.0.mlp.linear_fc1.weight", (60, 32)),
])
def test_shape_change_fails_and_names_the_tensor(runs, tmp_path, name, shape):
    src = _ckpt(runs["d2_tied"][0])
    rewrite_dcp(src, tmp_path / "ckpt", lambda m: m.__setitem__(name, torch.zeros(shape)))
    result = invoke("inspect-ckpt", tmp_path / "ckpt", "--strict")
    assert result.exit_code == 1
    out = inspect_checkpoint(tmp_path / "ckpt").as_dict()
    shapes = check(out, "shapes")
    assert shapes["tensors"] == [name]
    assert f"{name} is {shape}".replace(",)", ")") in shapes["reason"]


@pytest.mark.parametrize("pattern,expected", [
    ("mtp.layers.*.eh_proj.weight", ["mtp.layers.0.eh_proj.weight",
                                     "mtp.layers.1.eh_proj.weight"]),
    ("eh_proj", ["mtp.layers.0.eh_proj.weight", "mtp.layers.1.eh_proj.weight"]),
    (r"re:^mtp\.layers\.1\.(enorm|hnorm)\.weight$", ["mtp.layers.1.enorm.weight",
                                                     "mtp.layers.1.hnorm.weight"]),
    ("rng.*", ["rng.rank0"]),
])
def test_tensors_pattern(runs, pattern, expected):
    _, out = invoke_json("inspect-ckpt", runs["d2_tied"][0], "--tensors", pattern)
    assert sorted(t["name"] for t in out["tensors"]) == expected


def test_tensors_pattern_lists_shapes_in_text(runs):
    result = invoke("inspect-ckpt", runs["d2_tied"][0], "--tensors", "eh_proj")
    assert result.exit_code == 0
    assert "mtp.layers.1.eh_proj.weight  (32, 64)  float32" in result.stdout


def test_bad_regex_is_a_user_error(runs):
    result = invoke("inspect-ckpt", runs["d0"][0], "--tensors", "re:([")
    assert result.exit_code == 2
    assert "not a valid regular expression" in result.stderr


def test_run_dir_without_latest_uses_newest_complete(tmp_path):
    spec = tiny_spec(mtp={"num_layers": 1})
    write_dcp_checkpoint(tmp_path / "run", spec, step=5)
    write_dcp_checkpoint(tmp_path / "run", spec, step=20)
    (tmp_path / "run" / "checkpoints" / "step_0000030.tmp-abc").mkdir()  # an unfinished save
    (tmp_path / "run" / "checkpoints" / "latest").unlink()
    report = inspect_checkpoint(tmp_path / "run")
    assert report.checkpoint.path.name == "step_0000020"
    assert "latest is missing: using step_0000020" in report.checkpoint.notes[0]
    assert inspect_checkpoint(tmp_path / "run" / "checkpoints").checkpoint.step == 20


def test_spec_that_cannot_be_built_here_falls_back_to_the_keys(runs, tmp_path):
    """A te-backend spec on a machine without Transformer Engine: checks still run."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(_ckpt(runs["d1_untied"][0]), ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["spec"]["model"]["backend"] = "te"
    (ckpt / "meta.json").write_text(json.dumps(meta))
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here")
    report = inspect_checkpoint(ckpt)
    assert report.passed and report.expected_parameters is None
    assert any("cannot be built here" in note for note in report.checkpoint.notes)
    assert report.layout.depths == 1 and report.layout.depth_source == "spec"


def test_spec_option_overrides_the_stored_spec(runs, tmp_path):
    spec_file = tmp_path / "d3.yaml"
    spec_file.write_text(
        "model: {vocab_size: 64, hidden_size: 32, num_layers: 2, num_attention_heads: 4, "
        "ffn_hidden_size: 64, seq_length: 16}\nmtp: {num_layers: 3}\n")
    code, out = invoke_json("inspect-ckpt", runs["d2_tied"][0], "--spec", spec_file)
    assert out["spec_source"] == "--spec"
    depths = check(out, "mtp_depths")
    assert not depths["passed"] and depths["tensors"] == ["mtp.layers.2"]
    assert code == 0  # not --strict
    # D is said to come from the --spec file, not from the stored spec
    assert f"D=3 from --spec {spec_file}" in depths["reason"]
    assert "stored spec" not in depths["reason"]
    assert out["layout"]["mtp_depths_from"] == f"--spec {spec_file}"
    text = invoke("inspect-ckpt", runs["d2_tied"][0], "--spec", spec_file).stdout
    assert f"D=3 (from --spec {spec_file})" in " ".join(text.split())


def test_depths_source_is_named(runs, tmp_path):
    """The stored spec, or the keys when no spec is stored: each named as such."""
    out = invoke_json("inspect-ckpt", runs["d2_tied"][0])[1]
    assert "D=2 from the spec stored in meta.json" in check(out, "mtp_depths")["reason"]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(_ckpt(runs["d2_tied"][0]), ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["spec"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    out = invoke_json("inspect-ckpt", ckpt)[1]
    reason = check(out, "mtp_depths")["reason"]
    assert "D=2 from the keys (no spec stored or given)" in reason and "spec stored in" not in \
        reason
    assert out["layout"]["mtp_depths_source"] == "keys"
