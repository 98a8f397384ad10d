"""Sampling: speculative sampling leaves the main model's distribution unchanged.

The joint distribution of the first three generated tokens (vocabulary of 4) over thousands of
rows and several seeds, against the exact distribution computed from the main model alone, by a
chi-square test; the draft is made deliberately poor (its depths' output norms scaled up, so
it is confidently wrong), so rejections and residual resampling carry the result.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mtp_cli.generate.sampling import SamplingSettings, distribution
from mtp_cli.generate.teacher import depth_logits
from tests.generate_helpers import decode, random_model

VOCAB, NEW, ROWS, SEEDS = 4, 3, 1500, (0, 1, 2)
PROMPT = torch.tensor([1, 3, 0])


def _model():
    model = random_model(depths=2, vocab=VOCAB, seed=7, std=0.2)
    with torch.no_grad():
        for layer in model.mtp_layers():
            layer.final_layernorm.weight.mul_(8.0)  # peaked, poor drafts
    return model


def _exact(model, settings: SamplingSettings) -> dict[tuple[int, ...], float]:
    triples = list(itertools.product(range(VOCAB), repeat=NEW))
    ids = torch.stack([torch.cat([PROMPT, torch.tensor(t)]) for t in triples])
    probs = distribution(depth_logits(model, ids)[0], settings)  # [64, s, V]
    n = len(PROMPT)
    exact = {}
    for i, t in enumerate(triples):
        p = 1.0
        for j, token in enumerate(t):
            p *= float(probs[i, n - 1 + j, token])
        exact[t] = p
    return exact


def _p_value(counts: dict[tuple[int, ...], int], exact: dict[tuple[int, ...], float]) -> float:
    total = sum(counts.values())
    bins, rest_obs, rest_exp = [], 0.0, 0.0
    for key, p in exact.items():
        expected, observed = p * total, counts.get(key, 0)
        if expected < 5:
            rest_obs, rest_exp = rest_obs + observed, rest_exp + expected
        else:
            bins.append((observed, expected))
    if rest_exp > 0:
        bins.append((rest_obs, rest_exp))
    chi2 = sum((o - e) ** 2 / e for o, e in bins)
    df = len(bins) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(chi2 / 2, dtype=torch.float64)))


SLOW = pytest.mark.slow


@pytest.mark.parametrize(("draft_depths", "top_p"), [
    (2, 1.0), pytest.param(0, 1.0, marks=SLOW), pytest.param(1, 1.0, marks=SLOW),
    pytest.param(2, 0.8, marks=SLOW), pytest.param(0, 0.8, marks=SLOW)])
def test_sampled_joint_distribution_matches_the_main_model(draft_depths, top_p):
    model = _model()
    settings = SamplingSettings(temperature=1.0, top_p=top_p)
    exact = _exact(model, settings)
    assert abs(sum(exact.values()) - 1) < 1e-9
    counts: dict[tuple[int, ...], int] = {}
    rejected = 0
    for seed in SEEDS:
        out, decoder = decode(model, [PROMPT] * ROWS, NEW, draft_depths, settings=settings,
                              seed=seed)
        for ids in out:
            counts[tuple(ids)] = counts.get(tuple(ids), 0) + 1
        if decoder is not None:
            stats = decoder.counts
            rejected += stats.proposed[0] - stats.accepted[0]
    if draft_depths:
        assert rejected > ROWS // 10  # the draft is poor: many rejections were resampled
    assert _p_value(counts, exact) > 0.01


@pytest.mark.slow
def test_chi_square_detects_a_wrong_distribution():
    """The test has power: the same samples with 300 extra draws of one sequence (a few
    percent of the total) fail it."""
    model = _model()
    settings = SamplingSettings(temperature=1.0)
    exact = _exact(model, settings)
    counts: dict[tuple[int, ...], int] = {}
    for seed in SEEDS:
        out, _ = decode(model, [PROMPT] * ROWS, NEW, 1, settings=settings, seed=seed)
        for ids in out:
            counts[tuple(ids)] = counts.get(tuple(ids), 0) + 1
    skewed = {k: v for k, v in counts.items()}
    first = max(skewed, key=skewed.get)
    skewed[first] += ROWS // 5
    assert _p_value(skewed, exact) < 0.01
