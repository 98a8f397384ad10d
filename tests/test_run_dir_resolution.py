"""Which checkpoint a run resumes from (`RunDir.resolve`), with hostile and damaged files:
`latest` missing, garbage, escaping, a FIFO or /dev/zero; damaged meta.json, .metadata and
shards; a pickle that would run code. Never silently fresh, never a traceback, nothing run."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from mtp_cli.checkpoint.run_dir import RunDir
from mtp_cli.errors import UserError
from tests.ckpt_helpers import tiny_spec, write_dcp_checkpoint
from tests.hostile_files import flip_byte, make_fifo, plant_marker_pickle, shard, truncate


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run directory with complete checkpoints of steps 4 and 8; latest names step 8."""
    run = tmp_path_factory.mktemp("resolve") / "run"
    spec = tiny_spec(mtp={"num_layers": 1})
    write_dcp_checkpoint(run, spec, step=4, tokens=1024)
    write_dcp_checkpoint(run, spec, step=8, tokens=2048)
    return run


@pytest.fixture
def run(two_checkpoints, tmp_path) -> RunDir:
    target = tmp_path / "run"
    shutil.copytree(two_checkpoints, target)
    return RunDir(target)


def step(run: RunDir, n: int):
    return run.checkpoints / f"step_{n:07d}"


def test_latest_is_used_and_newer_checkpoints_are_listed(run):
    run.latest_marker.write_text("step_0000004\n")
    resolution = run.resolve()
    assert resolution.step == 4 and resolution.warnings == ()
    assert resolution.newer == (step(run, 8),)


def _dev_zero(run):
    run.latest_marker.unlink()
    os.symlink("/dev/zero", run.latest_marker)


@pytest.mark.parametrize("damage,reason", [
    (lambda run: run.latest_marker.unlink(), "latest is missing"),
    (lambda run: run.latest_marker.write_bytes(b"\xff\xfe\x00garbage"), "is not UTF-8 text"),
    (lambda run: run.latest_marker.write_text("../../x\n"), "holds '../../x', not the name"),
    (lambda run: run.latest_marker.write_text("step_0000099\n"), "which does not exist"),
    (lambda run: run.latest_marker.write_text(""), "holds '', not the name"),
    (lambda run: make_fifo(run.latest_marker), "is not a regular file"),
    (_dev_zero, "is not a regular file"),
    (lambda run: run.latest_marker.write_text("step_0000008" + " " * 10_000),
     "more than the 4096 bytes"),
])
def test_a_bad_latest_falls_back_to_the_newest_checkpoint_that_validates(run, damage, reason):
    damage(run)
    resolution = run.resolve()
    assert resolution.step == 8 and resolution.newer == ()
    (warning,) = resolution.warnings
    assert reason in warning and "using step_0000008, the newest checkpoint that validates" \
        in warning


def _meta(run, text: bytes):
    (step(run, 8) / "meta.json").write_bytes(text)


@pytest.mark.parametrize("damage,reason", [
    (lambda run: (step(run, 8) / "meta.json").unlink(), "meta.json: is missing"),
    (lambda run: _meta(run, b"[1, 2, 3]"), "meta.json: holds a JSON list, not an object"),
    (lambda run: _meta(run, b'{"step": "8"}'), "'step' is '8', not a step number"),
    (lambda run: _meta(run, b'{"step": 8.0}'), "'step' is 8.0, not a step number"),
    (lambda run: _meta(run, b'{"step": true}'), "'step' is True, not a step number"),
    (lambda run: _meta(run, b'{"step": 7}'), "'step' is 7, but the directory step_0000008"),
    (lambda run: _meta(run, b'{"step": 8, "x": "\xff"}'), "meta.json: is not UTF-8 text"),
    (lambda run: _meta(run, b'{"step": 8,'), "meta.json: does not parse as JSON"),
    (lambda run: _meta(run, b"[" * 100_000), "meta.json: does not parse as JSON"),
    (lambda run: truncate(step(run, 8) / ".metadata"), ".metadata: DCP metadata does not parse"),
    (lambda run: (step(run, 8) / ".metadata").write_bytes(b"\x80\x04garbage"),
     ".metadata: DCP metadata does not parse"),
    (lambda run: (step(run, 8) / ".metadata").unlink(), ".metadata: is missing"),
    (lambda run: truncate(shard(step(run, 8))), "shard is truncated"),
    (lambda run: shard(step(run, 8)).unlink(), "shard named in .metadata is missing"),
    (lambda run: make_fifo(shard(step(run, 8))), "shard is not a regular file"),
])
def test_a_damaged_latest_checkpoint_falls_back_with_the_file_named(run, damage, reason):
    damage(run)
    resolution = run.resolve()
    assert resolution.step == 4
    assert resolution.newer == (step(run, 8),)  # moved aside on resume, never deleted
    (warning,) = resolution.warnings
    assert "names step_0000008, which does not validate" in warning
    assert reason in warning and "using step_0000004" in warning
    assert str(step(run, 8)) in warning  # the file at fault is named


def test_a_pickle_in_metadata_is_refused_and_never_run(run, tmp_path):
    marker = tmp_path / "marker"
    plant_marker_pickle(step(run, 8), marker)
    resolution = run.resolve()
    assert resolution.step == 4
    assert "refusing to load tests.hostile_files.write_marker" in resolution.warnings[0]
    assert not marker.exists()


def test_a_damaged_older_checkpoint_is_skipped_and_named(run):
    run.latest_marker.unlink()
    truncate(shard(step(run, 8)))
    resolution = run.resolve()
    assert resolution.step == 4
    assert "skipped: " in resolution.warnings[0] and "shard is truncated" in \
        resolution.warnings[0]


def test_when_none_validates_it_is_an_error_naming_each_never_a_fresh_start(run):
    truncate(shard(step(run, 8)))
    (step(run, 4) / "meta.json").write_text("[]")
    with pytest.raises(UserError) as raised:
        run.resolve()
    text = raised.value.render()
    assert "checkpoints exist but none validates" in text and "--overwrite" in text
    assert "step_0000008/__0_0.distcp: shard is truncated" in text
    assert "step_0000004/meta.json: holds a JSON list" in text


def test_no_checkpoints_is_a_fresh_start(tmp_path):
    run = RunDir(tmp_path / "fresh")
    assert run.resolve().checkpoint is None and run.resolve().warnings == ()
    run.checkpoints.mkdir(parents=True)
    run.latest_marker.write_text("step_0000004\n")
    resolution = run.resolve()
    assert resolution.checkpoint is None
    assert "which does not exist; no checkpoint to resume from" in resolution.warnings[0]


def test_checksums_catch_a_flipped_byte_the_lengths_cannot(run):
    from mtp_cli.checkpoint.checksums import directory_checksums

    for n in (4, 8):
        meta = json.loads((step(run, n) / "meta.json").read_text())
        meta["checksums"] = directory_checksums(step(run, n))
        (step(run, n) / "meta.json").write_text(json.dumps(meta))
    assert run.resolve().step == 8
    flip_byte(shard(step(run, 8)))
    assert run.resolve(checksums=False).step == 8  # same length: only the digest tells
    resolution = run.resolve()
    assert resolution.step == 4
    assert "does not match its SHA-256 checksum" in resolution.warnings[0]


def test_abandon_moves_without_overwriting(run):
    run.abandoned.mkdir()
    (run.abandoned / "step_0000008").mkdir()
    (moved,) = run.abandon([step(run, 8)])
    assert moved == run.abandoned / "step_0000008.1"
    assert (moved / "meta.json").exists() and not step(run, 8).exists()
    assert run.resolve().step == 4  # latest no longer exists: the next newest


def test_prune_orders_by_step_and_keeps_latest_and_anything_newer(tmp_path):
    run = RunDir(tmp_path)
    for n in (9_999_999, 10_000_000, 10_000_001, 10_000_002):
        (run.checkpoints / f"step_{n:07d}").mkdir(parents=True)
    (run.checkpoints / "abandoned" / "step_0000001").mkdir(parents=True)
    run.latest_marker.write_text("step_10000001\n")  # step_10000002 is newer than latest
    removed = run.prune(2)
    assert [p.name for p in removed] == ["step_9999999"]  # by name it would have been 10000000
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [
        "abandoned", "latest", "step_10000000", "step_10000001", "step_10000002"]
    assert [p.name for p in run.prune(1)] == ["step_10000000"]
    assert (run.checkpoints / "abandoned" / "step_0000001").is_dir()


def test_resume_abandons_newer_checkpoints_and_points_latest_at_the_one_used(run):
    from mtp_cli.train.resume import decide_resume

    truncate(shard(step(run, 8)))
    (run.checkpoints / "step_0000012.tmp-dead").mkdir()  # a save that never finished
    said: list[str] = []
    assert decide_resume(run, said.append) == ("resume", "step_0000004")
    assert run.latest_marker.read_text() == "step_0000004\n"
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [
        "abandoned", "latest", "step_0000004"]
    assert (run.abandoned / "step_0000008" / "meta.json").is_file()
    assert said == [f"moved step_0000008 to {run.abandoned}: it is newer than step_0000004, the "
                    "checkpoint this run resumes from (kept there, never pruned)"]
    assert decide_resume(run, said.append) == ("resume", "step_0000004")  # now plain
    assert len(said) == 1
    (step(run, 4) / "meta.json").write_text("[]")
    kind, problems = decide_resume(run, said.append)
    assert kind == "error" and "none validates" in problems[0].message
