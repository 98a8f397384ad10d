"""Damaged or wrong input to `mtp inspect-ckpt`: a clear message, exit 2, no traceback."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from tests.ckpt_helpers import tiny_spec, write_dcp_checkpoint
from tests.cli_helpers import run_mtp
from tests.inspect_fixtures import invoke, reference_state_dict, save_state_dict


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("good") / "run"
    write_dcp_checkpoint(run, tiny_spec(mtp={"num_layers": 1}))
    return run


@pytest.fixture
def run_copy(good_run, tmp_path):
    """A fresh copy of the good run to damage."""
    target = tmp_path / "run"
    shutil.copytree(good_run, target)
    return target, target / "checkpoints" / "step_0000010"


def _fails_cleanly(*args, message: str) -> str:
    result = invoke("inspect-ckpt", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.stderr


def test_missing_path(tmp_path):
    _fails_cleanly(tmp_path / "nope", message="no such file or directory")


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _fails_cleanly(tmp_path, message="not a checkpoint")


def test_text_file_is_not_a_state_dict(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_text("definitely not a checkpoint\n")
    _fails_cleanly(path, message="not a torch.save state dict")


def test_random_bytes_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 8)
    _fails_cleanly(path, message=str(path))


@pytest.mark.parametrize("payload,message", [
    ([1, 2, 3], "holds a list, not a state dict"),
    ({"lr": 0.1, "iteration": 3}, "no tensors in it"),
])
def test_torch_save_of_something_else(tmp_path, payload, message):
    path = tmp_path / "x.pt"
    torch.save(payload, path)
    _fails_cleanly(path, message=message)


def test_truncated_torch_save_file(tmp_path):
    path = save_state_dict(tmp_path / "ref.pt", reference_state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _fails_cleanly(path, message="not a readable torch.save file")


def test_truncated_shard(run_copy):
    run, ckpt = run_copy
    shard = next(ckpt.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    err = _fails_cleanly(run, message="shard is truncated")
    assert shard.name in err


def test_missing_shard(run_copy):
    run, ckpt = run_copy
    next(ckpt.glob("*.distcp")).unlink()
    _fails_cleanly(run, message="is missing")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_metadata_that_does_not_parse(run_copy, damage):
    run, ckpt = run_copy
    metadata = ckpt / ".metadata"
    data = metadata.read_bytes()
    metadata.write_bytes({"garbage": b"\x00\x01not a pickle", "truncated": data[: len(data) // 2],
                          "empty": b""}[damage])
    _fails_cleanly(run, message="DCP metadata does not parse")


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_metadata_naming_other_classes_is_refused_unrun(run_copy, tmp_path):
    run, ckpt = run_copy
    target = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Evil(str(target))))
    _fails_cleanly(run, message="refusing to load io.open")
    assert not target.exists()


def test_meta_json_that_does_not_parse(run_copy):
    run, ckpt = run_copy
    (ckpt / "meta.json").write_text('{"step": 10, "spec": {')
    _fails_cleanly(run, message="meta.json: does not parse as JSON")


def test_meta_json_with_an_invalid_spec(run_copy):
    run, ckpt = run_copy
    (ckpt / "meta.json").write_text('{"step": 10, "spec": {"model": {"hidden_size": 0}}}')
    err = _fails_cleanly(run, message="meta.json")
    assert "spec.model" in err


def test_latest_naming_a_missing_checkpoint_falls_back_with_a_note(run_copy):
    """The same resolution as a resume: the newest checkpoint that validates, and why."""
    run, _ = run_copy
    (run / "checkpoints" / "latest").write_text("step_0009999\n")
    result = invoke("inspect-ckpt", str(run), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["path"].endswith("step_0000010")
    assert any("names step_0009999, which does not exist: using step_0000010" in note
               for note in report["notes"]), report["notes"]


def test_run_whose_only_checkpoint_is_damaged_names_it(run_copy):
    run, ckpt = run_copy
    (ckpt / "meta.json").write_text('[1, 2]')
    err = _fails_cleanly(run, message="checkpoints exist but none validates")
    assert "meta.json: holds a JSON list, not an object" in err.replace("\n", " ")


def test_strict_failure_exits_1_and_user_error_exits_2_end_to_end(tmp_path):
    """As a user runs it: a subprocess, exit codes and messages."""
    state = reference_state_dict()
    state["mtp.layers.0.output_layer.weight"] = state["output_layer.weight"] + 1.0
    path = save_state_dict(tmp_path / "ref.pt", state)
    failed = run_mtp("inspect-ckpt", str(path), "--strict")
    assert failed.returncode == 1
    assert "mtp.layers.0.output_layer.weight differs from output_layer.weight: max abs " \
           "difference 1" in failed.stdout
    missing = run_mtp("inspect-ckpt", str(tmp_path / "missing"))
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr
    assert "Traceback" not in missing.stderr
