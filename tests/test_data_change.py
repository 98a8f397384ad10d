"""A resume on changed data is named: the loader's position carries a fingerprint of the data
(paths or blend, files' sizes and modification times, split, tokenizer)."""

from __future__ import annotations

import os

import pytest
import torch

from mtp_cli.data import MicroBatchLoader, TokenStream, TokenWindows, write_indexed_dataset
from mtp_cli.data.datasets import data_fingerprint
from mtp_cli.errors import UserError
from tests.data_helpers import make_spec


def loader(fingerprint: int, allow: bool = False) -> MicroBatchLoader:
    tokens = torch.arange(200) % 100
    windows = TokenWindows(TokenStream(tokens, torch.tensor([0, 200]), eod=100), 8)
    return MicroBatchLoader(windows, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0,
                            data_fingerprint=fingerprint, allow_data_change=allow)


def test_a_position_on_other_data_is_refused_or_restarted_on_request():
    saved = loader(11)
    for _ in range(5):
        saved.next_batch()
    state = saved.state_dict()
    same = loader(11)
    same.load_state_dict(state)
    assert same.micro_batches == 5
    with pytest.raises(UserError, match="allow_data_change"):
        loader(12).load_state_dict(state)
    restarted = loader(12, allow=True)
    restarted.load_state_dict(state)
    assert restarted.micro_batches == 0
    old = dict(state)
    del old["data_fingerprint"]  # a checkpoint written before fingerprints: resumes as before
    legacy = loader(12)
    legacy.load_state_dict(old)
    assert legacy.micro_batches == 5


def test_fingerprint_follows_the_files_and_the_blend(tmp_path):
    write_indexed_dataset(tmp_path / "a", [[1, 2, 3]])
    write_indexed_dataset(tmp_path / "b", [[4, 5, 6]])
    blend = [{"path": str(tmp_path / "a"), "weight": 1}, {"path": str(tmp_path / "b"),
                                                          "weight": 1}]
    first = data_fingerprint(make_spec(blend=blend))
    assert data_fingerprint(make_spec(blend=blend)) == first < 2**53
    reweighted = [blend[0], {**blend[1], "weight": 2}]
    assert data_fingerprint(make_spec(blend=reweighted)) != first
    assert data_fingerprint(make_spec(path=str(tmp_path / "a"))) != first
    stat = (tmp_path / "b.bin").stat()
    os.utime(tmp_path / "b.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert data_fingerprint(make_spec(blend=blend)) != first
