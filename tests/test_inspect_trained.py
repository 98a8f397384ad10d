"""Acceptance: checkpoints and metrics written by a real `mtp train` run.

One short run per configuration (D = 0, 1 untied, 2 tied, 2 with a repeated layer), shared by
every test of the module. `inspect-ckpt --strict` passes on each; after tampering with a
checkpoint it fails and names the tensor; `mtp report` on the D=0 and D=1 runs writes the plots.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.ckpt_helpers import rewrite_dcp
from tests.cli_helpers import SPECS, run_mtp
from tests.inspect_fixtures import check, invoke, invoke_json

pytestmark = pytest.mark.slow  # four real `mtp train` launches

TINY = ["model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "model.seq_length=32", "train.steps=3", "train.micro_batch_size=2",
        "train.global_batch_size=2", "train.warmup_steps=1", "train.eval_interval=2",
        "train.eval_steps=1", "checkpoint.interval=0", "logging.tensorboard=false"]
CONFIGS = {
    "d0": ["mtp.num_layers=0"],
    "d1_untied": ["mtp.num_layers=1"],
    "d2_tied": ["mtp.num_layers=2", "model.share_embeddings_and_output_weights=true"],
    "d2_repeated": ["mtp.num_layers=2", "mtp.use_repeated_layer=true"],
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    runs = {}
    for name, overrides in CONFIGS.items():
        run_dir = root / name
        done = run_mtp("train", str(SPECS / "tiny.yaml"), *TINY, *overrides,
                       "--run-dir", str(run_dir), timeout=600, real_process=True)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = run_dir
    return runs


def _latest(run_dir):
    checkpoints = run_dir / "checkpoints"
    return checkpoints / (checkpoints / "latest").read_text().strip()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_strict_passes_on_trained_checkpoints(trained, name):
    code, out = invoke_json("inspect-ckpt", trained[name], "--strict")
    assert code == 0, out["checks"]
    meta = json.loads((_latest(trained[name]) / "meta.json").read_text())
    assert out["step"] == meta["step"] == 3 and out["tokens"] == meta["tokens"]
    assert out["losses"] == meta["losses"]
    assert out["parameters"]["stored"] == out["parameters"]["expected"]
    depths = meta["spec"]["mtp"]["num_layers"]
    present = 1 if meta["spec"]["mtp"]["use_repeated_layer"] else depths
    assert out["layout"]["mtp_depths_present"] == [f"mtp.layers.{k}" for k in range(present)]
    assert {s["section"] for s in out["sections"]} >= {"optimizer", "trainer", "rng", "data"}


def test_removed_depth_fails_and_is_named(trained, tmp_path):
    def drop(model):
        for name in [n for n in model if n.startswith("mtp.layers.1.")]:
            del model[name]

    rewrite_dcp(_latest(trained["d2_tied"]), tmp_path / "ckpt", drop)
    result = invoke("inspect-ckpt", tmp_path / "ckpt", "--strict")
    assert result.exit_code == 1
    assert "missing mtp.layers.1" in result.stdout


def test_differing_embedding_copy_fails_and_is_named(trained, tmp_path):
    copy = "mtp.layers.0.embedding.word_embeddings.weight"

    def add_copy(model):
        model[copy] = model["embedding.word_embeddings.weight"].clone()
        model[copy][5] += 0.5

    rewrite_dcp(_latest(trained["d1_untied"]), tmp_path / "ckpt", add_copy)
    code, out = invoke_json("inspect-ckpt", tmp_path / "ckpt", "--strict")
    assert code == 1
    ties = check(out, "mtp_ties")
    assert ties["tensors"] == [copy]
    assert ties["details"][0]["max_abs_diff"] == pytest.approx(0.5, abs=1e-6)


def test_changed_shape_fails_and_is_named(trained, tmp_path):
    name = "mtp.layers.0.eh_proj.weight"
    rewrite_dcp(_latest(trained["d2_repeated"]), tmp_path / "ckpt",
                lambda model: model.__setitem__(name, torch.zeros(32, 48)))
    code, out = invoke_json("inspect-ckpt", tmp_path / "ckpt", "--strict")
    assert code == 1
    assert check(out, "shapes")["tensors"] == [name]
    assert f"{name} is (32, 48), spec says (32, 64)" in check(out, "shapes")["reason"]


def test_report_on_d0_and_d1_runs_writes_the_plots(trained, tmp_path):
    result = invoke("report", trained["d0"], trained["d1_untied"], "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "report_acceptance_vs_steps.png", "report_loss_vs_steps.png",
        "report_loss_vs_tokens.png"]
    lines = [json.loads(x) for x in
             (trained["d1_untied"] / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x.get("split") != "val"]
    d1 = out["runs"][1]
    assert d1["mtp_depths"] == 1 and out["runs"][0]["mtp_depths"] == 0
    assert d1["train"]["lm_loss"]["last"] == train[-1]["lm_loss"]
    assert d1["train"]["mtp_1_loss"]["min"] == min(x["mtp_1_loss"] for x in train)
    assert d1["validation"]["val_lm_loss"]["last"] == \
        [x for x in lines if x.get("split") == "val"][-1]["val_lm_loss"]
    assert out["comparison"][0]["run"] == d1["label"]
