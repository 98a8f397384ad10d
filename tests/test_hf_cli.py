"""`mtp export` and `mtp import` as a user runs them (slow: fresh processes): a round trip
through the command line, and bad input exiting 2 with the file named, no traceback, nothing
written."""

from __future__ import annotations

import json

import pytest

from tests.ckpt_helpers import write_dcp_checkpoint
from tests.cli_helpers import run_mtp
from tests.hf_models import dense_sections, random_model, read_safetensors_dir

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def test_export_then_import_from_the_command_line(tmp_path):
    """The default export of a Llama-shaped model is MiMo's layout (it loads in transformers,
    vLLM and SGLang), and export -> import -> export gives the same files."""
    spec, model = random_model(dense_sections(), 5)
    write_dcp_checkpoint(tmp_path / "run", spec, model_state=model.state_dict())
    exported = run_mtp("export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"),
                       "--shard-size", "40KB", "--json")
    assert exported.returncode == 0, exported.stderr
    summary = json.loads(exported.stdout)
    assert summary["architecture"] == "MiMoForCausalLM" and summary["shards"] > 1
    imported = run_mtp("import", str(tmp_path / "hf"), "--out", str(tmp_path / "back"),
                       "model.seq_length=16")
    assert imported.returncode == 0, imported.stderr
    assert "mtp train" in imported.stdout and (tmp_path / "back" / "spec.yaml").is_file()
    again = run_mtp("export", str(tmp_path / "back"), "--out", str(tmp_path / "hf2"))
    assert again.returncode == 0, again.stderr
    first, second = read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(tmp_path / "hf2")
    assert sorted(first) == sorted(second)
    assert all(first[k].equal(second[k]) for k in first)


def test_bad_input_exits_2_naming_the_file(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    cases = [
        (("import", str(tmp_path / "hf"), "--out", str(tmp_path / "out")), "config.json"),
        (("export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")), "nowhere"),
        (("export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--dtype",
          "int8"), "--dtype"),
        (("import", str(tmp_path / "hf"), "--out", str(tmp_path / "hf")), "--out is or holds the input"),
    ]
    for args, named in cases:
        result = run_mtp(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert named in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
