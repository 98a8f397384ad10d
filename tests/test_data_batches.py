"""Windows and micro-batches: plain and packed, against hand-built references."""

from __future__ import annotations

import pytest
import torch

from mtp_cli.config import load_spec
from mtp_cli.data import MicroBatchLoader, build_datasets, packed_batch, plain_batch
from mtp_cli.errors import SpecError
from tests.cli_helpers import SPECS
from tests.data_helpers import EOD, make_spec, write_text_files

a, b, c, d, e, f, g, h, i, j = b"abcdefghij"
E = EOD


@pytest.fixture
def corpus(tmp_path):
    """Stream: a b c E d e E f g h i j E (13 tokens)."""
    write_text_files(tmp_path, {"1.txt": b"abc", "2.txt": b"de", "3.txt": b"fghij"})
    return str(tmp_path)


def test_windows_overlap_by_one_token(corpus):
    train, _ = build_datasets(make_spec(path=corpus, seq_length=4))
    assert len(train) == 3  # (13 - 1) // 4
    assert [train[k].tolist() for k in range(3)] == [
        [a, b, c, E, d], [d, e, E, f, g], [g, h, i, j, E]]
    assert train[0].dtype == torch.int64
    with pytest.raises(IndexError):
        train[3]


def test_plain_batch_is_inputs_and_next_token_labels(corpus):
    train, _ = build_datasets(make_spec(path=corpus, seq_length=4))
    batch = plain_batch(train.windows([0, 2]))
    assert batch.input_ids.tolist() == [[a, b, c, E], [g, h, i, j]]
    assert batch.labels.tolist() == [[b, c, E, d], [h, i, j, E]]
    assert batch.loss_mask.dtype == torch.float32 and batch.loss_mask.tolist() == [[1.0] * 4] * 2
    assert batch.position_ids.tolist() == [[0, 1, 2, 3]] * 2
    assert batch.packed_seq_params is None and batch.num_tokens == 8


def test_packed_batch_boundaries_positions_and_mask(corpus):
    train, _ = build_datasets(make_spec(path=corpus, seq_length=8))
    batch = packed_batch(train[0], EOD)  # window a b c E d e E f | g
    assert batch.input_ids.tolist() == [[a, b, c, E, d, e, E, f]]
    assert batch.labels.tolist() == [[b, c, E, d, e, E, f, g]]
    # Documents [a b c E], [d e E], [f (cut by the window)].
    params = batch.packed_seq_params
    assert params.cu_seqlens_q.tolist() == [0, 4, 7, 8] and params.cu_seqlens_q_padded is None
    assert params.cu_seqlens_q.dtype == torch.int32 and params.max_seqlen_q == 4
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    # EOD positions (label = next document's first token) are out of the loss; the cut last
    # document keeps its last position (label g is its true next token).
    assert batch.loss_mask.tolist() == [[1, 1, 1, 0, 1, 1, 0, 1]]
    assert batch.num_tokens == 6


def test_packed_batch_window_starting_mid_document_and_ending_on_eod(corpus):
    train, _ = build_datasets(make_spec(path=corpus, seq_length=3))
    # windows of 4: [a b c E] [E d e E] [E f g h] [h i j E]
    batch = packed_batch(train[1], EOD)
    assert batch.input_ids.tolist() == [[E, d, e]]
    assert batch.packed_seq_params.cu_seqlens_q.tolist() == [0, 1, 3]
    assert batch.position_ids.tolist() == [[0, 0, 1]]
    assert batch.loss_mask.tolist() == [[0, 1, 1]]
    batch = packed_batch(train[0], EOD)  # a b c | E: the window ends on the document's end
    assert batch.packed_seq_params.cu_seqlens_q.tolist() == [0, 3]


def test_loader_builds_packed_batches_and_moves_them(corpus):
    train, _ = build_datasets(make_spec(path=corpus, seq_length=8))
    loader = MicroBatchLoader(train, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0,
                              packed=True)
    batch = loader.next_batch().to("cpu")
    assert batch.packed_seq_params.cu_seqlens_q.tolist() == [0, 4, 7, 8]
    assert batch.packed_seq_params.cu_seqlens_kv.tolist() == [0, 4, 7, 8]
    with pytest.raises(Exception, match="micro_batch_size 1"):
        MicroBatchLoader(train, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0, packed=True)


def test_spec_rule_packed_needs_micro_batch_size_one():
    with pytest.raises(SpecError) as info:
        load_spec(SPECS / "tiny.yaml", ["data.packed=true"])
    assert "data.packed" in str(info.value) and "micro_batch_size 1" in str(info.value)
    spec = load_spec(SPECS / "tiny.yaml", ["data.packed=true", "train.micro_batch_size=1"])
    assert spec.data.packed
