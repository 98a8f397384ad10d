"""MLA decodes from its compressed cache: `kv_lora_rank + rope` values per token and layer, the
up-projections absorbed into the query and output. The reference is the path before it, which
cached the per-head keys and values (`KVCache(expanded_mla=True)`), and the cache-free forward
of training; float64, YaRN with both temperatures away from 1, MTP depths 1-3."""

from __future__ import annotations

import pytest
import torch

from mtp_cli.generate.kv_cache import KVCache
from mtp_cli.generate.streams import depth_forward, main_forward
from mtp_cli.generate.teacher import depth_hidden
from tests.generate_helpers import decode, prompts_of, random_model

RANK, ROPE, QK, V, HEADS, LAYERS = 16, 8, 12, 10, 4, 2
MLA = {"multi_latent_attention": True, "num_query_groups": None, "q_lora_rank": 24,
       "kv_lora_rank": RANK, "qk_head_dim": QK, "qk_pos_emb_head_dim": ROPE, "v_head_dim": V,
       "qk_layernorm": True, "rope_type": "yarn", "rotary_scaling_factor": 4.0,
       "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 0.8}
LENGTHS = [3, 9, 1, 6]  # a batch of prompts of different lengths


def _model(depths: int = 3, vocab: int = 6, seed: int = 0):
    return random_model(depths=depths, vocab=vocab, seed=seed, layers=LAYERS, extra=MLA)


def _up_projections(model) -> list[int]:
    """A counter of `linear_kv_up_proj` calls over every MLA layer (decoder and depths)."""
    calls = [0]
    for name, module in model.named_modules():
        if name.endswith("linear_kv_up_proj"):
            module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_greedy_tokens_and_draft_logits_equal_the_expanded_cache():
    """Plain and speculative decoding (K = 1..3, caches rewound after rejected drafts, a batch of
    uneven prompts) give the tokens of the expanded cache; every draft logit within 1e-5."""
    model = _model()
    prompts = prompts_of(LENGTHS, 6)
    plain, _ = decode(model, prompts, 20)
    reference_plain, _ = decode(model, prompts, 20, expanded_mla=True)
    assert plain == reference_plain
    accepted = 0
    for k in (1, 2, 3):
        out, decoder = decode(model, prompts, 20, k, record=True)
        reference, ref_decoder = decode(model, prompts, 20, k, record=True, expanded_mla=True)
        assert out == reference == plain, k
        assert len(decoder.rounds) == len(ref_decoder.rounds) > 3
        for mine, theirs in zip(decoder.rounds, ref_decoder.rounds, strict=True):
            for a, b in zip(mine.draft_logits, theirs.draft_logits, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        accepted += decoder.counts.drafts_accepted
    assert accepted > 0  # rollback after accepted and rejected drafts both ran


def _forward_both(model, caches, tokens, hidden=None, depth=0):
    """One forward of the same new positions through each cache; commits nothing."""
    if depth:
        return [depth_forward(model, depth, c, hidden, tokens) for c in caches]
    return [main_forward(model, c, tokens) for c in caches]


@torch.no_grad()
def test_step_logits_equal_expanded_cache_and_cache_free_forward():
    """Prefill of ragged rows, one-token steps, a 3-token verify chunk and a rewind: every
    forward's logits equal the expanded cache's (1e-5) and, at the end, the cache-free forward
    over the committed tokens. Decoding steps up-project no key or value; the prefill does."""
    model = _model(depths=1)
    ids = torch.randint(0, 6, (2, 14), generator=torch.Generator().manual_seed(4))
    caches = [KVCache(2, 16), KVCache(2, 16, expanded_mla=True)]
    calls = _up_projections(model)
    lengths = torch.tensor([5, 3])

    def step(tokens: torch.Tensor, commit: torch.Tensor) -> None:
        before = calls[0]
        mine, ref = _forward_both(model, caches, tokens)
        torch.testing.assert_close(model.logits(mine), model.logits(ref), atol=1e-5, rtol=0)
        if int(caches[0].lengths.min()) > 0:  # decoding: only the expanded reference projects
            assert calls[0] - before == LAYERS
        for c in caches:
            c.commit(commit)

    def gathered(n: int) -> torch.Tensor:  # each row's next n tokens of `ids`
        return torch.stack([ids[b, lengths[b] + torch.arange(n)] for b in range(2)])

    step(ids[:, :5], lengths)  # row 1 is padded past its 3 tokens
    assert calls[0] == 2 * LAYERS  # the prefill up-projects, on both caches
    for _ in range(3):
        step(gathered(1), lengths + 1)
        lengths = lengths + 1
    step(gathered(3), lengths + 3)  # a verify chunk of 3 positions
    lengths = lengths + 1  # ... of which one is kept: rewind past the other two
    for c in caches:
        c.commit(lengths)
    step(gathered(2), lengths + 2)
    lengths = lengths + 2
    mine = main_forward(model, caches[0], gathered(1))  # [1, b, h]
    for b in range(2):
        n = int(lengths[b])
        expected = depth_hidden(model, ids[b:b + 1, :n + 1])[0][n:, 0]  # cache-free
        torch.testing.assert_close(model.logits(mine[:, b:b + 1]),
                                   model.logits(expected[:, None]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("expanded", [False, True])
def test_cache_holds_latent_and_rope_key_per_token_and_layer(expanded):
    """The compressed cache stores `[capacity, b, kv_lora_rank + rope]` per layer, decoder and
    MTP depth alike: (16 + 8) float64 values per token and layer against 4 heads x (12 + 8 + 10)
    for the expanded reference."""
    model = _model(depths=2)
    _, decoder = decode(model, prompts_of([4, 7], 6), 6, 2, expanded_mla=expanded)
    main, depth = decoder.caches[0], decoder.caches[2]
    capacity = decoder.seqs.capacity
    per_token = (HEADS * (QK + ROPE + V)) if expanded else RANK + ROPE
    assert main.bytes_per_token() == LAYERS * per_token * 8
    assert depth.bytes_per_token() == per_token * 8  # one transformer layer per depth
    for number in (1, 2):
        shapes = [tuple(t.shape) for t in main.stored(number)]
        assert shapes == ([(capacity, 2, HEADS, QK + ROPE), (capacity, 2, HEADS, V)] if expanded
                          else [(capacity, 2, RANK + ROPE)])
        assert all(t.dtype == torch.float64 for t in main.stored(number))
