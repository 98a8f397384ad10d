"""`data.synthetic`: generated tasks, deterministic by seed, with held-out splits that never
share a problem with training, in bytes that specs/tiny.yaml's 320-id vocabulary takes."""

from __future__ import annotations

import random
import re
import zlib
from pathlib import Path

import pytest

from mtp_cli.config import load_spec
from mtp_cli.config.schema import SyntheticConfig
from mtp_cli.data.datasets import build_datasets
from mtp_cli.data.synthetic import induction_document, synthetic_documents
from mtp_cli.errors import SpecError

SPECS = Path(__file__).resolve().parents[1] / "specs"


@pytest.mark.parametrize("task", ["induction", "addition", "sorting"])
def test_same_seed_same_documents_other_seed_others(task):
    config = SyntheticConfig(task=task, documents=50, val_documents=10)
    first = synthetic_documents(config, 64, "train")
    assert first == synthetic_documents(config, 64, "train")
    assert first != synthetic_documents(config.model_copy(update={"seed": 7}), 64, "train")
    assert synthetic_documents(config, 64, "val") != first[:10]
    assert all(len(d) <= 63 and max(d) < 128 for d in first)  # ASCII, one window each


def test_induction_second_half_is_copied_spans_of_the_first():
    rng = random.Random(0)
    doc = induction_document(rng, SyntheticConfig(task="induction", alphabet=5), 40, False)
    first, second = doc[:20].decode(), doc[20:].decode()
    assert len(doc) == 40 and set(doc.decode()) <= set("abcde")
    # greedily cover the second half by substrings (>= 4 letters, except the cut last one)
    position = 0
    while position < len(second):
        size = max(n for n in range(1, len(second) - position + 1)
                   if second[position:position + n] in first)
        assert size >= 4 or position + size == len(second)
        position += size


def _problems(documents: list[bytes]) -> set[str]:
    return {line.split("=")[0] for d in documents for line in d.decode().splitlines()}


def test_addition_lines_are_right_and_held_out_problems_never_train():
    config = SyntheticConfig(task="addition", documents=300, val_documents=60, digits=2)
    train = synthetic_documents(config, 64, "train")
    val = synthetic_documents(config, 64, "val")
    for doc in train + val:
        for line in doc.decode().splitlines():
            a, b, c = map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", line).groups())
            assert a + b == c and a < 100 and b < 100
    held = _problems(val)
    assert held and not held & _problems(train)
    assert all((31 * int(p.split("+")[0]) + 17 * int(p.split("+")[1])) % 20 == 0 for p in held)


def test_sorting_lines_are_sorted_and_held_out_sets_never_train():
    config = SyntheticConfig(task="sorting", documents=200, val_documents=50)
    train = synthetic_documents(config, 64, "train")
    val = synthetic_documents(config, 64, "val")
    for doc in train + val:
        for line in doc.decode().splitlines():
            letters, out = line.split("=")
            assert out == "".join(sorted(letters)) and 3 <= len(letters) <= 10
    sets = lambda docs: {"".join(sorted(p)) for p in _problems(docs)}  # noqa: E731
    assert not sets(train) & sets(val)
    assert all(zlib.crc32(s.encode()) % 20 == 0 for s in sets(val))


def test_tiny_spec_trains_on_it_one_document_per_window():
    spec = load_spec(SPECS / "tiny.yaml", ["data.synthetic.task=induction",
                                           "data.synthetic.documents=40",
                                           "data.synthetic.val_documents=8"])
    train, val = build_datasets(spec)
    # 64 tokens a document (63 letters + EOD); windows of 65 overlap by one: 40 x 64 - 1 // 64
    assert (len(train), len(val)) == (39, 7)
    window = train.windows([3])[0]
    assert window[63] == 256 and (window[:63] < 128).all() and window[64] < 128


def test_rules_name_the_key():
    with pytest.raises(SpecError, match=r"data\.synthetic.*data\.path"):
        load_spec(SPECS / "tiny.yaml", ["data.synthetic.task=sorting", "data.path=x"])
    with pytest.raises(SpecError, match="val_documents"):
        load_spec(SPECS / "tiny.yaml", ["data.synthetic.task=sorting",
                                        "data.synthetic.val_documents=1",
                                        "data.synthetic.length=10"])
