"""Plain KV-cache decoding: one prefill over the prompts, then one position per step.

Prompts of different lengths are right-padded in the prefill; each row takes its next token from
its own last prompt position, and from then on every row advances one slot per forward. A row
that is done stops advancing (its slot is recomputed, harmlessly, until all rows are done).
"""

from __future__ import annotations

import torch

from mtp_cli.generate.kv_cache import KVCache
from mtp_cli.generate.sampling import SamplingSettings, choose
from mtp_cli.generate.sequences import Sequences
from mtp_cli.generate.streams import main_forward
from mtp_cli.gpt import GPTModel


@torch.no_grad()
def decode_plain(model: GPTModel, seqs: Sequences, settings: SamplingSettings,
                 generator: torch.Generator | None = None, *, expanded_mla: bool = False) -> int:
    """Decode `seqs` to completion; returns the number of main-model forwards.
    `expanded_mla`: the reference cache of per-head MLA keys (`KVCache`), for tests only."""
    batch = seqs.batch
    cache = KVCache(batch, seqs.capacity, seqs.device, expanded_mla=expanded_mla)
    rows = torch.arange(batch, device=seqs.device)
    prompt = seqs.tokens[:, :int(seqs.count.max())]
    hidden = main_forward(model, cache, prompt)  # [s, b, h]
    cache.commit(seqs.count.clone())
    last = hidden[seqs.count - 1, rows]  # [b, h]
    forwards = 1
    while True:
        token = choose(model.logits(last[None])[:, 0], settings, generator)  # [b]
        seqs.commit(token[:, None], torch.ones_like(token))
        if seqs.all_done:
            return forwards
        hidden = main_forward(model, cache, seqs.tokens[rows, seqs.count - 1][:, None])
        cache.advance((~seqs.done).long())
        last = hidden[0]
        forwards += 1
