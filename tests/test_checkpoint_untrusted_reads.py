"""checkpoint_io: every DCP read goes through the allow list (plain DCP runs a pickle's code,
ours never does), a shard that does not load is named, a full disk stays recognisable through
DCP's gathering of failures."""

from __future__ import annotations

import errno
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from mtp_cli.checkpoint import CheckpointFileError, load_state, read_metadata
from mtp_cli.checkpoint.disk_full import find_disk_full, save_state
from mtp_cli.launch.faults import EnvFaults, raise_disk_full
from tests.hostile_files import MarkerPickle, plant_marker_pickle, shard


def _save(state, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=directory, no_dist=True)


@pytest.fixture
def checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    _save({"model": {"w": torch.arange(12.0).reshape(3, 4)}, "trainer": {"step": 3}}, directory)
    return directory


def _fresh():
    return {"model": {"w": torch.zeros(3, 4)}, "trainer": {"step": 0}}


def test_safe_load_reads_back_what_was_saved(checkpoint):
    state = _fresh()
    load_state(state, checkpoint, no_dist=True)
    assert torch.equal(state["model"]["w"], torch.arange(12.0).reshape(3, 4))
    assert state["trainer"]["step"] == 3


def test_a_metadata_pickle_runs_in_plain_dcp_and_never_through_ours(checkpoint, tmp_path):
    marker = tmp_path / "marker"
    plant_marker_pickle(checkpoint, marker)
    with pytest.raises(CheckpointFileError) as raised:
        load_state(_fresh(), checkpoint, no_dist=True)
    assert raised.value.path == checkpoint / ".metadata"
    assert "refusing to load tests.hostile_files.write_marker" in raised.value.reason
    with pytest.raises(CheckpointFileError):
        read_metadata(checkpoint)
    assert not marker.exists()
    dcp.FileSystemReader(checkpoint).read_metadata()  # what a resume used to do
    assert marker.exists()  # so the hostile file is real: plain pickle ran its code


def test_a_pickled_value_is_loaded_weights_only(tmp_path):
    directory, marker = tmp_path / "ckpt", tmp_path / "marker"
    _save({"trainer": {"payload": MarkerPickle(marker)}}, directory)
    with pytest.raises(CheckpointFileError) as raised:
        load_state({"trainer": {"payload": None}}, directory, no_dist=True)
    assert raised.value.path == directory / "__0_0.distcp"
    assert not marker.exists()


def test_a_structurally_corrupt_shard_is_named(checkpoint):
    path = shard(checkpoint)
    path.write_bytes(b"\0" * path.stat().st_size)  # every length still checks out
    with pytest.raises(CheckpointFileError) as raised:
        load_state(_fresh(), checkpoint, no_dist=True)
    assert raised.value.path == path and raised.value.reason.startswith("does not load (")


def test_checkpoint_file_errors_survive_pickling_across_ranks(tmp_path):
    error = pickle.loads(pickle.dumps(CheckpointFileError(tmp_path / "x", "is odd")))
    assert isinstance(error, CheckpointFileError) and error.render() == f"{tmp_path / 'x'}: is odd"


def test_a_full_disk_is_found_behind_torch_saves_error_and_through_dcp(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError) as raised:
        raise_disk_full()  # what torch.save raises on a full disk
    assert "unexpected pos" in str(raised.value)
    assert find_disk_full(raised.value).errno == errno.ENOSPC
    assert find_disk_full(pickle.loads(pickle.dumps(raised.value))) is None  # context lost
    monkeypatch.setenv("MTP_TEST_DISK_FULL", "0:7")
    with pytest.raises(CheckpointException) as gathered, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_state({"w": torch.ones(4)}, tmp_path / "full",
                   before_write=lambda: EnvFaults().disk_full(7, 0))
    found = find_disk_full(pickle.loads(pickle.dumps(gathered.value)))  # as other ranks see it
    assert found is not None and found.errno == errno.ENOSPC
