"""The meta record (`mtp_cli.checkpoint.meta`): the bytes `mtp train` and `mtp import` have
always written, a lossless round trip, and one reader that refuses a malformed record with a
line naming `meta.json` (exit 2) in every command that opens a checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest

from mtp_cli.checkpoint import CheckpointFileError, CheckpointMeta, read_meta, write_meta
from mtp_cli.checkpoint.meta import META_FORMAT
from tests.ckpt_helpers import tiny_spec, write_dcp_checkpoint
from tests.cli_helpers import run_mtp

DIGEST = "ab" * 32


def _trained() -> CheckpointMeta:
    """A record as `Checkpointer` writes it after a non-finite step, checksums on."""
    return CheckpointMeta(
        step=300, tokens=76800, spec={"model": {"hidden_size": 32}}, losses={"lm_loss": None,
                                                                           "mtp_1_loss": 3.5},
        world_size=2, parallel={"data": 2, "tensor": 1, "pipeline": 1, "context": 1},
        mtp_cumulative={"correct": [5], "total": [10]}, created="2026-11-28T12:00:00Z",
        mtp_cli_version="0.1.0", nonfinite=True, checksums={"__0_0.distcp": DIGEST})


def test_a_trained_record_is_written_with_the_keys_in_their_old_order():
    """The reference is the dict `train/checkpoint.py` built by hand before the dataclass."""
    old = {
        "format": "mtp-cli-checkpoint/1", "step": 300, "tokens": 76800,
        "spec": {"model": {"hidden_size": 32}}, "losses": {"lm_loss": None, "mtp_1_loss": 3.5},
        "world_size": 2, "parallel": {"data": 2, "tensor": 1, "pipeline": 1, "context": 1},
        "mtp_cumulative": {"correct": [5], "total": [10]}, "created": "2026-11-28T12:00:00Z",
        "mtp_cli_version": "0.1.0", "nonfinite": True, "checksums": {"__0_0.distcp": DIGEST},
    }
    assert _trained().to_json() == json.dumps(old, indent=2) + "\n"


def test_an_imported_record_puts_the_writers_keys_before_the_checksums():
    """The reference: `hf/step0_checkpoint.py`'s dict, `**extra` after the version."""
    meta = CheckpointMeta(step=0, tokens=0, spec={}, losses={}, world_size=1, parallel={},
                          mtp_cumulative={"correct": [], "total": []}, created="c",
                          mtp_cli_version="v", extra={"imported_from": {"fresh": []}},
                          checksums={})
    assert list(meta.to_dict()) == [
        "format", "step", "tokens", "spec", "losses", "world_size", "parallel",
        "mtp_cumulative", "created", "mtp_cli_version", "imported_from", "checksums"]
    assert "nonfinite" not in meta.to_dict()  # written only when true, as before


def test_the_record_round_trips(tmp_path):
    write_meta(tmp_path, _trained())
    assert read_meta(tmp_path) == _trained()
    assert (tmp_path / "meta.json").read_text() == _trained().to_json()
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]  # no temporary left


def test_a_record_without_a_format_reads_as_version_1_and_keeps_unknown_keys(tmp_path):
    (tmp_path / "meta.json").write_text('{"step": 4, "note": "by hand", "tokens": null}')
    meta = read_meta(tmp_path)
    assert (meta.step, meta.format, meta.tokens, meta.spec) == (4, None, None, None)
    assert meta.extra == {"note": "by hand"}
    assert meta.to_dict() == {"step": 4, "note": "by hand"}
    assert META_FORMAT == "mtp-cli-checkpoint/1"


@pytest.mark.parametrize(("record", "reason"), [
    ({"step": "8"}, "'step' is '8', not a step number"),
    ({"step": 8.0}, "'step' is 8.0, not a step number"),
    ({"step": True}, "'step' is True, not a step number"),
    ({"step": -1}, "'step' is -1, not a step number"),
    ({"tokens": 5}, "'step' is None, not a step number"),
    ({"step": 8, "tokens": "many"}, "'tokens' is 'many', not a token count"),
    ({"step": 8, "spec": [1, 2]}, "'spec' is [1, 2], not a mapping"),
    ({"step": 8, "losses": {"lm_loss": "low"}}, "not a mapping of loss names to numbers"),
    ({"step": 8, "parallel": {"data": "2"}}, "not a mapping of parallel sizes"),
    ({"step": 8, "nonfinite": "yes"}, "'nonfinite' is 'yes', not true or false"),
    ({"step": 8, "checksums": {"a": "xyz"}}, "not a mapping of file names to SHA-256 hex"),
    ({"step": 8, "format": "other/1"}, "'format' is 'other/1', not mtp-cli-checkpoint/N"),
    ({"step": 8, "format": 1}, "'format' is 1, not mtp-cli-checkpoint/N"),
    ({"step": 8, "format": "mtp-cli-checkpoint/2"}, "written by a newer mtp-cli"),
])
def test_a_malformed_record_is_refused_naming_the_file(tmp_path, record, reason):
    (tmp_path / "meta.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointFileError) as raised:
        read_meta(tmp_path)
    assert raised.value.path == tmp_path / "meta.json"
    assert reason in raised.value.reason


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("good") / "run"
    return write_dcp_checkpoint(run, tiny_spec(mtp={"num_layers": 1}))


@pytest.mark.parametrize("command", ["inspect-ckpt", "export"])
def test_every_reader_refuses_a_malformed_step_with_exit_2(checkpoint_dir, tmp_path, command):
    """Not only a resume: `inspect-ckpt` and `export` read meta.json through the same reader
    (before, they read a step of "8" as no step at all)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "step": "8"}))
    extra = ["--out", str(tmp_path / "hf")] if command == "export" else []
    result = run_mtp(command, str(ckpt), *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{ckpt / 'meta.json'}: 'step' is '8', not a step number" in " ".join(
        result.stderr.split())
    assert "Traceback" not in result.stderr
