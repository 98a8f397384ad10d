"""Weighted blends (`data.blend`): Megatron-Core's largest-shortfall assignment, sample for
sample, and what `build_datasets` and the loader make of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtp_cli.config.loader import load_spec
from mtp_cli.data import MicroBatchLoader, build_datasets, write_indexed_dataset
from mtp_cli.data.blend import BlendedWindows, blending_indices
from mtp_cli.errors import UserError
from tests.data_helpers import EOD, make_spec

REFERENCE = Path(__file__).parent / "data" / "megatron_blend" / "reference.json"


@pytest.mark.parametrize("case", json.loads(REFERENCE.read_text()),
                         ids=lambda case: str(case["weights"]))
def test_blending_indices_equal_megatron_cores_helpers_cpp(case):
    # reference.json: Megatron-Core 0.19.2's compiled build_blending_indices (make.py there)
    size = len(case["dataset_index"])
    dataset_index, sample_index = blending_indices(case["weights"], size)
    assert dataset_index.tolist() == case["dataset_index"]
    assert sample_index.tolist() == case["sample_index"]


@pytest.mark.parametrize("weights", [[0.3, 0.7], [1, 1, 1], [0.05, 0.15, 0.8], [3, 1, 7, 2]])
def test_every_prefix_is_within_two_samples_of_its_share(weights):
    size = 3000
    dataset_index, sample_index = blending_indices(weights, size)
    shares = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    onehot = torch.nn.functional.one_hot(dataset_index.long(), len(weights)).to(torch.float64)
    counts = onehot.cumsum(0)  # [n, datasets]: samples of each among the first n
    n = torch.arange(1, size + 1, dtype=torch.float64)[:, None]
    assert float((counts - shares * n).abs().max()) < 2
    # the k-th sample of a dataset is its sample number k: consecutive per dataset
    for i in range(len(weights)):
        assert sample_index[dataset_index == i].tolist() == list(
            range(int((dataset_index == i).sum())))


def two_corpora(tmp_path):
    """Dataset a: tokens 1..99, b: tokens 100..199 (so every window says where it came from)."""
    generator = torch.Generator().manual_seed(0)
    for name, low in (("a", 1), ("b", 100)):
        documents = [torch.randint(low, low + 99, (int(n),), generator=generator).tolist()
                     for n in torch.randint(5, 30, (40,), generator=generator)]
        write_indexed_dataset(tmp_path / name, documents, dtype=torch.uint16)
    return str(tmp_path / "a"), str(tmp_path / "b")


def source_of(window: torch.Tensor) -> int:
    body = window[window != EOD]
    return 0 if int(body.max()) < 100 else 1


def test_blend_samples_follow_the_weights_and_come_from_their_dataset(tmp_path):
    a, b = two_corpora(tmp_path)
    spec = make_spec(blend=[{"path": a, "weight": 0.3}, {"path": b, "weight": 0.7}],
                     val_fraction=0.1)
    train, val = build_datasets(spec)
    assert isinstance(train, BlendedWindows)
    assert len(train) == spec.train.steps * spec.train.global_batch_size
    expected, _ = blending_indices([0.3, 0.7], len(train))
    assert [source_of(train[k]) for k in range(len(train))] == expected.tolist()
    assert train.fractions() == pytest.approx([0.3, 0.7], abs=2 / len(train))
    # validation blends each dataset's own held-out documents
    own_val = [build_datasets(make_spec(path=p, val_fraction=0.1))[1] for p in (a, b)]
    assert len(val) == sum(len(v) for v in own_val)
    held_out = {tuple(v[i].tolist()) for v in own_val for i in range(len(v))}
    assert all(tuple(val[k].tolist()) in held_out for k in range(len(val)))


def test_megatron_string_gives_the_same_blend(tmp_path):
    a, b = two_corpora(tmp_path)
    listed, _ = build_datasets(make_spec(blend=[{"path": a, "weight": 0.3},
                                                {"path": b, "weight": 0.7}]))
    string, _ = build_datasets(make_spec(blend=f"0.3 {a} 0.7 {b}"))
    assert all(torch.equal(listed[k], string[k]) for k in range(0, len(listed), 7))


def test_an_undersampled_dataset_is_drawn_from_all_of_it_and_repeats_reshuffled(tmp_path):
    a, b = two_corpora(tmp_path)
    train, _ = build_datasets(make_spec(blend=[{"path": a, "weight": 1}, {"path": b,
                                                                          "weight": 1}]))
    part = train.parts[0].windows
    firsts = [train._window(0, s) for s in range(len(part))]
    seconds = [train._window(0, s) for s in range(len(part), 2 * len(part))]
    assert sorted(firsts) == sorted(seconds) == list(range(len(part)))
    assert firsts != seconds and firsts != list(range(len(part)))


def test_loader_keeps_the_blend_order_and_the_global_batch_at_any_dp(tmp_path):
    a, b = two_corpora(tmp_path)
    train, _ = build_datasets(make_spec(blend=f"0.3 {a} 0.7 {b}"))
    one = MicroBatchLoader(train, micro_batch_size=2, dp_rank=0, dp_size=1, seed=1,
                           global_batch_size=4)
    two = [MicroBatchLoader(train, micro_batch_size=2, dp_rank=r, dp_size=2, seed=1,
                            global_batch_size=4) for r in range(2)]
    for _ in range(3):
        whole = torch.cat([one.next_batch().input_ids, one.next_batch().input_ids])
        split = torch.cat([loader.next_batch().input_ids for loader in two])
        assert torch.equal(whole, split)
    assert one.sample_indices(0) == [0, 1]  # not reshuffled: the blend's own order


def test_blend_and_path_together_are_refused():
    model = {"vocab_size": 320, "hidden_size": 8, "num_layers": 1, "num_attention_heads": 2,
             "seq_length": 8}
    with pytest.raises(UserError, match=r"data\.path or data\.blend"):
        load_spec({"model": model, "data": {"path": "x", "blend": "1 y"}})
    with pytest.raises(UserError, match="WEIGHT PATH"):
        load_spec({"model": model, "data": {"blend": "0.5 a 0.5"}})
