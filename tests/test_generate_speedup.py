"""`mtp generate`'s speed-up: plain and speculative decoding timed in interleaved pairs, the
median of the pairs' ratios reported, never one timing of each."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from mtp_cli.builders.model_builder import build_model
from mtp_cli.data.tokenizer import ByteTokenizer
from mtp_cli.errors import UserError
from mtp_cli.generate.load import LoadedModel
from mtp_cli.generate.run import GenerateOptions, generate
from mtp_cli.generate.stats import interleaved_speedup
from tests.generate_helpers import tiny_spec


def test_interleaved_speedup_alternates_and_takes_the_median_ratio():
    calls = []
    plain_times, spec_times = iter([4.0, 9.0, 6.0, 3.0]), iter([2.0, 1.0, 3.0, 3.0])

    def plain():
        calls.append("plain")
        return next(plain_times)

    def speculative():
        calls.append("speculative")
        return next(spec_times)

    timing = interleaved_speedup(plain, speculative, 4)
    assert calls == ["plain", "speculative"] * 4
    assert timing.ratios == [2.0, 9.0, 2.0, 1.0]
    assert timing.speedup == 2.0  # median of 1, 2, 2, 9 (the mean would be 3.5)


def _loaded() -> LoadedModel:
    spec = tiny_spec(depths=2, vocab=320, hidden=32, seq_length=64)
    torch.manual_seed(0)
    return LoadedModel(build_model(spec).eval(), spec, ByteTokenizer(), Path("."), None, None)


def test_generate_reports_the_median_of_interleaved_pairs(monkeypatch):
    """A fake clock: the first (streamed) speculative decoding takes 100 s and is no timing;
    then 3 pairs (plain 4, 6, 5 s; speculative 2, 2, 5 s): ratios 2, 3, 1, speed-up 2 (the
    ratio of the median seconds, 5 / 2, would be 2.5)."""
    durations = iter([100.0, 4.0, 2.0, 6.0, 2.0, 5.0, 5.0])
    now = [0.0]
    ticks = itertools.count()

    def clock():  # two reads per decoding: its start and its end
        if next(ticks) % 2:
            now[0] += next(durations)
        return now[0]

    monkeypatch.setattr("mtp_cli.generate.run.time.perf_counter", clock)
    result = generate(_loaded(), ["def f("], GenerateOptions(max_new_tokens=6,
                                                              speedup_repeats=3)).as_dict()
    assert result["speedup_repeats"] == 3
    assert result["speedup_ratios"] == [2.0, 3.0, 1.0]
    assert result["speedup"] == 2.0
    assert result["seconds"] == 2.0 and result["plain"]["seconds"] == 5.0
    assert result["identical_to_plain"] is True
    with pytest.raises(StopIteration):
        next(durations)  # exactly seven decodings were timed


def test_speedup_repeats_must_be_positive():
    with pytest.raises(UserError, match="speedup-repeats"):
        generate(_loaded(), ["x"], GenerateOptions(max_new_tokens=2, speedup_repeats=0))
