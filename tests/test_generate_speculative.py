"""Exact self-speculative decoding: the same tokens as plain decoding, drafts equal to a full
recomputation, acceptance equal to the teacher-forced count, the cache used (not recomputed)."""

from __future__ import annotations

import pytest
import torch

from mtp_cli.generate.teacher import depth_logits, joint_prefix_counts
from tests.generate_helpers import decode, prompts_of, random_model

LENGTHS = [3, 9, 1, 6]  # a batch of prompts of different lengths


SLOW = pytest.mark.slow


@pytest.mark.parametrize(("position", "depths"), [
    ("rope", 3), ("learned_absolute", 2), pytest.param("rope", 1, marks=SLOW),
    pytest.param("rope", 2, marks=SLOW), pytest.param("learned_absolute", 1, marks=SLOW),
    pytest.param("learned_absolute", 3, marks=SLOW)])
def test_greedy_speculative_equals_plain_random_weights(position, depths):
    model = random_model(depths=depths, position=position, vocab=6)
    prompts = prompts_of(LENGTHS, 6)
    plain, _ = decode(model, prompts, 24)
    accepted = 0
    for k in range(1, depths + 1):
        out, decoder = decode(model, prompts, 24, k)
        assert out == plain, (k, out, plain)
        accepted += decoder.counts.drafts_accepted
    assert accepted > 0  # the comparison covered accepted drafts, not only rejections


def _sequence(final: list[int], prompt: torch.Tensor) -> torch.Tensor:
    return torch.cat([prompt, torch.tensor(final, dtype=torch.long)])


@pytest.mark.parametrize("position", ["rope", pytest.param("learned_absolute", marks=SLOW)])
def test_draft_logits_equal_full_recomputation(position):
    """Each round's draft logits of every depth equal one forward over the committed tokens
    with the round's drafts substituted, with no cache (float32, 1e-5)."""
    model = random_model(depths=3, position=position, vocab=6, dtype=torch.float32)
    prompts = prompts_of([4, 7], 6, seed=1)
    out, decoder = decode(model, prompts, 10, 3, record=True)
    checked = 0
    for rnd in decoder.rounds:
        for row in range(len(prompts)):
            if not rnd.active[row]:
                continue
            c = int(rnd.committed[row])
            committed = _sequence(out[row], prompts[row])[:c]
            drafted = rnd.drafts[row]
            ids = torch.cat([committed, drafted])[None]
            reference = depth_logits(model, ids)
            for k, logits in enumerate(rnd.draft_logits, start=1):
                torch.testing.assert_close(logits[row], reference[k][0, c - 2],
                                           atol=1e-5, rtol=0)
                checked += 1
    assert checked > 10
    assert decoder.counts.drafts_accepted > 0  # caches kept rows computed from accepted drafts


@pytest.mark.parametrize("depths", [pytest.param(2, marks=SLOW), 3])
def test_accepted_drafts_equal_teacher_forced_joint_prefix(depths):
    model = random_model(depths=depths, vocab=5, seed=3)
    prompts = prompts_of([5, 2, 8], 5, seed=2)
    out, decoder = decode(model, prompts, 30, depths, record=True)
    for row in range(len(prompts)):
        sequence = _sequence(out[row], prompts[row])
        counts = joint_prefix_counts(depth_logits(model, sequence[None]), sequence[None])[0]
        for rnd in decoder.rounds:
            if not rnd.active[row]:
                continue
            c, k_round = int(rnd.committed[row]), rnd.drafts.shape[1]
            actual = min(int(rnd.accepted[row]), len(sequence) - c)
            assert actual == min(int(counts[c - 2]), k_round), (row, c)
    assert decoder.counts.drafts_accepted > 0


def test_plain_decoding_runs_one_prefill_then_one_position_per_token():
    model = random_model(depths=0, vocab=8)
    prompts = prompts_of([5, 3], 8)
    shapes = []
    model.decoder.register_forward_hook(lambda module, args, out: shapes.append(out.shape[0]))
    new = 12
    out, _ = decode(model, prompts, new)
    assert [len(x) for x in out] == [new, new]
    assert shapes == [5] + [1] * (new - 1)


def test_kv_cache_decoding_equals_recomputation_without_cache():
    """Plain greedy decoding with the cache gives the tokens of re-running the whole sequence
    every step (float64)."""
    model = random_model(depths=1, vocab=7)
    prompt = prompts_of([4], 7)[0]
    out, _ = decode(model, [prompt], 10)
    sequence = prompt.clone()
    for _ in range(10):
        logits = depth_logits(model, sequence[None])[0]
        sequence = torch.cat([sequence, logits[0, -1].argmax()[None]])
    assert out[0] == sequence[len(prompt):].tolist()


def test_end_of_document_stops_each_sequence():
    model = random_model(depths=2, vocab=4, seed=5)
    prompts = prompts_of([3, 5, 2], 4, seed=4)
    plain, _ = decode(model, prompts, 30, eod=2)
    spec, _ = decode(model, prompts, 30, 2, eod=2)
    assert plain == spec
    for ids in plain:
        assert 2 not in ids[:-1] and (len(ids) == 30 or ids[-1] == 2)
    assert any(ids and ids[-1] == 2 for ids in plain)


@pytest.mark.parametrize("spec_file", ["tiny_moe.yaml"])
def test_mla_moe_model_speculative_equals_plain(spec_file):
    model = random_model(depths=2, vocab=6, spec_file=spec_file, hidden=32,
                         extra={"num_attention_heads": 2})
    prompts = prompts_of([4, 2, 7], 6)
    plain, _ = decode(model, prompts, 16)
    for k in (1, 2):
        assert decode(model, prompts, 16, k)[0] == plain


def test_single_prompt_speculative_equals_plain():
    """Batch 1 takes the cache's and buffers' slice paths."""
    model = random_model(depths=3, vocab=5, seed=11)
    prompt = prompts_of([6], 5, seed=5)
    plain, _ = decode(model, prompt, 30)
    for k in (1, 3):
        out, decoder = decode(model, prompt, 30, k)
        assert out == plain
    assert decoder.counts.drafts_accepted > 0


def test_repeated_mtp_layer_drafts_at_every_depth():
    """`mtp.use_repeated_layer`: one layer applied at each depth, each depth its own cache."""
    from mtp_cli.builders.model_builder import build_model
    from mtp_cli.config.loader import load_spec
    from tests.generate_helpers import tiny_spec

    data = tiny_spec(depths=3, vocab=5, extra={"init_method_std": 0.3}).model_dump(mode="json")
    data["mtp"]["use_repeated_layer"] = True
    model = build_model(load_spec(data)).double().eval()
    assert len(model.mtp_layers()) == 1
    prompts = prompts_of([5, 2], 5, seed=8)
    plain, _ = decode(model, prompts, 20)
    out, decoder = decode(model, prompts, 20, 3, record=True)
    assert out == plain
    rnd = decoder.rounds[2]
    committed = torch.cat([prompts[0], torch.tensor(out[0])])[:int(rnd.committed[0])]
    reference = depth_logits(model, torch.cat([committed, rnd.drafts[0]])[None])
    for k, logits in enumerate(rnd.draft_logits, start=1):
        torch.testing.assert_close(logits[0], reference[k][0, len(committed) - 2])
