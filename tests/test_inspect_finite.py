"""`inspect-ckpt --strict` fails a checkpoint holding a non-finite weight or loss; the weights
are read one tensor at a time."""

from __future__ import annotations

import json

import pytest

from mtp_cli import build_model
from mtp_cli.inspect import inspect_checkpoint, open_checkpoint
from mtp_cli.inspect.finite import check_finite
from tests.ckpt_helpers import tiny_spec, write_dcp_checkpoint
from tests.inspect_fixtures import invoke


@pytest.fixture
def spec():
    return tiny_spec(mtp={"num_layers": 1})


def test_a_nan_weight_fails_strict_naming_the_tensor(tmp_path, spec):
    state = build_model(spec).state_dict()
    state["mtp.layers.0.eh_proj.weight"][3, 5] = float("nan")
    state["decoder.layers.1.mlp.linear_fc2.bias"][0] = float("-inf")
    write_dcp_checkpoint(tmp_path, spec, model_state=state)
    relaxed = invoke("inspect-ckpt", str(tmp_path))
    assert relaxed.exit_code == 0, relaxed.output  # the finite check reads every weight: --strict
    result = invoke("inspect-ckpt", str(tmp_path), "--strict", "--json")
    assert result.exit_code == 1
    (check,) = [c for c in json.loads(result.stdout)["checks"] if c["name"] == "finite"]
    assert not check["passed"]
    assert check["tensors"] == ["decoder.layers.1.mlp.linear_fc2.bias",
                                "mtp.layers.0.eh_proj.weight"]
    assert {d["tensor"]: d["nonfinite_elements"] for d in check["details"]} == {
        "decoder.layers.1.mlp.linear_fc2.bias": 1, "mtp.layers.0.eh_proj.weight": 1}


def test_a_null_loss_in_meta_json_fails_strict(tmp_path, spec):
    checkpoint = write_dcp_checkpoint(tmp_path, spec)
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["losses"]["lm_loss"] = None
    meta["nonfinite"] = True
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    report = inspect_checkpoint(tmp_path, finite=True)
    (check,) = [c for c in report.checks if c.name == "finite"]
    assert not check.passed and check.reason == "non-finite losses in meta.json: lm_loss"


def test_a_healthy_checkpoint_passes_reading_one_tensor_at_a_time(tmp_path, spec):
    write_dcp_checkpoint(tmp_path, spec)
    checkpoint = open_checkpoint(tmp_path)
    reads: list[list[str]] = []
    reader = checkpoint.reader
    checkpoint.reader = lambda names: (reads.append(list(names)), reader(names))[1]
    check = check_finite(checkpoint)
    assert check.passed, check.reason
    assert sorted(r[0] for r in reads) == sorted(checkpoint.tensors)
    assert all(len(r) == 1 for r in reads)
