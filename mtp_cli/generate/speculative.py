"""Exact self-speculative decoding with the model's own MTP depths as the draft.

State (per row b; C = committed tokens, the last of which the main model has not seen yet):
* the main stream's cache holds rows `0 .. C-2`; `hidden[0]` their `h0`;
* depth k's cache holds the rows whose inputs are all committed (row j needs token `j + k`);
  `hidden[k]` their `h_k`, which depth k+1 reads.

A round: depth k = 1..K computes its rows up to `C-2` (token `j + k` past the committed ones is
the draft of an earlier depth of this round) and drafts token `C-1+k` from row `C-2`; the main
model verifies `[t_{C-1}, d_C .. d_{C+K-1}]` in one forward; the longest prefix of drafts equal
to the main model's choice is accepted (greedy), or each draft is accepted with probability
`min(1, p/q)` and the first rejection resampled from `normalise(max(0, p - q))` (sampling), and
the main model's token after the accepted prefix is added. Then every cache is rewound to the rows
whose inputs were all committed: drafts never stay in a cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mtp_cli.generate.kv_cache import KVCache
from mtp_cli.generate.sampling import SamplingSettings, distribution, sample
from mtp_cli.generate.sequences import Sequences
from mtp_cli.generate.stats import SpeculativeCounts
from mtp_cli.generate.streams import depth_forward, gather_rows, main_forward, scatter_rows
from mtp_cli.gpt import GPTModel


@dataclass
class Round:
    """What one round did (kept when `record=True`: tests compare it to full recomputations)."""

    committed: torch.Tensor  # [b] C before the round
    active: torch.Tensor  # [b] rows not done at the start
    drafts: torch.Tensor  # [b, K_round]
    draft_logits: list[torch.Tensor] = field(default_factory=list)  # K_round x [b, V]
    accepted: torch.Tensor | None = None  # [b] drafts accepted (before any cut at the limit)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SpeculativeDecoder:
    def __init__(self, model: GPTModel, seqs: Sequences, settings: SamplingSettings,
                 draft_depths: int, generator: torch.Generator | None = None,
                 record: bool = False, clock: Callable[[], float] = time.perf_counter,
                 expanded_mla: bool = False) -> None:
        """`clock` times the draft and verify steps (a benchmark on a shared CPU may pass
        `time.process_time`); `expanded_mla`: the reference caches (`KVCache`), tests only."""
        self.model, self.seqs, self.settings = model, seqs, settings
        self.clock = clock
        self.K, self.generator, self.record = draft_depths, generator, record
        b, cap, device = seqs.batch, seqs.capacity, seqs.device
        self.caches = [KVCache(b, cap, device, expanded_mla=expanded_mla)
                       for _ in range(draft_depths + 1)]
        dtype = model.output_weight().dtype
        h = model.config.hidden_size
        self.hidden = [torch.zeros(b, cap, h, dtype=dtype, device=device)
                       for _ in range(draft_depths)]
        self.rows = torch.arange(b, device=device)
        self.counts = SpeculativeCounts(draft_depths)
        self.rounds: list[Round] = []

    @torch.no_grad()
    def run(self) -> SpeculativeCounts:
        seqs = self.seqs
        self._prefill()
        while not seqs.all_done:
            self._round()
        return self.counts

    def _prefill(self) -> None:
        seqs, cache = self.seqs, self.caches[0]
        prompt = seqs.tokens[:, :int(seqs.count.max())]
        start = self.clock()
        hidden = main_forward(self.model, cache, prompt)  # [s, b, h]
        cache.commit(seqs.count.clone())
        if self.K:
            s = prompt.shape[1]
            rows = torch.arange(s, device=seqs.device).expand(seqs.batch, s)
            scatter_rows(self.hidden[0], rows, hidden.transpose(0, 1),
                         rows < seqs.count[:, None])
        last = hidden[seqs.count - 1, self.rows]
        logits = self.model.logits(last[None])[:, 0]
        token = self._choose(logits)
        _sync(seqs.device)
        self.counts.prefill_seconds += self.clock() - start
        self.counts.main_forwards += 1
        seqs.commit(token[:, None], torch.ones_like(token))

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        if self.settings.greedy:
            return logits.argmax(-1)
        return sample(distribution(logits, self.settings), self.generator)

    def _draft(self, k_round: int, committed: torch.Tensor) -> tuple[torch.Tensor, list, list]:
        """Depths 1..k_round draft tokens C .. C+k_round-1; returns drafts `[b, k_round]`, the
        draft distributions (sampling) and the draft logits."""
        seqs, model = self.seqs, self.model
        end = committed - 1  # rows 0 .. C-2
        drafts, q_probs, logits_list = [], [], []
        for k in range(1, k_round + 1):
            cache = self.caches[k]
            start = cache.lengths
            count = end - start
            s = int(count.max())
            rows = start[:, None] + torch.arange(s, device=seqs.device)
            hidden_in = gather_rows(self.hidden[k - 1], rows).transpose(0, 1)
            tokens = gather_rows(seqs.tokens, rows + k)
            t0 = self.clock()
            hidden = depth_forward(model, k, cache, hidden_in, tokens)  # [s, b, h]
            cache.commit(end)
            if k < self.K:
                scatter_rows(self.hidden[k], rows, hidden.transpose(0, 1),
                             rows < end[:, None])
            last = hidden[(count - 1).clamp(min=0), self.rows]
            logits = model.logits(last[None])[:, 0]
            if self.settings.greedy:
                draft = logits.argmax(-1)
            else:
                q = distribution(logits, self.settings)
                draft = sample(q, self.generator)
                q_probs.append(q)
            _sync(seqs.device)
            self.counts.draft_seconds += self.clock() - t0
            self.counts.draft_forwards += 1
            seqs.tokens[self.rows, committed - 1 + k] = draft
            drafts.append(draft)
            logits_list.append(logits)
        shape = (seqs.batch, 0)
        stacked = torch.stack(drafts, 1) if drafts else torch.zeros(shape, dtype=torch.long,
                                                                      device=seqs.device)
        return stacked, q_probs, logits_list

    def _accept(self, logits: torch.Tensor, drafts: torch.Tensor, q_probs: list
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(accepted drafts per row `[b]`, the token after them `[b]`)."""
        k_round = drafts.shape[1]
        if self.settings.greedy:
            choice = logits.argmax(-1)  # [b, k+1]
            match = (choice[:, :k_round] == drafts).long()
            accepted = match.cumprod(1).sum(1)
            return accepted, choice[self.rows, accepted]
        p = distribution(logits, self.settings)  # [b, k+1, V]
        accepted = torch.full_like(self.rows, k_round)
        if k_round:
            q = torch.stack(q_probs, 1)  # [b, k, V]
            p_d = p[:, :k_round].gather(-1, drafts[..., None])[..., 0]
            q_d = q.gather(-1, drafts[..., None])[..., 0]
            u = torch.rand(drafts.shape, dtype=torch.float64, device=drafts.device,
                           generator=self.generator)
            ok = (u * q_d < p_d).long()  # u < p/q, without dividing
            accepted = ok.cumprod(1).sum(1)
        at = accepted.clamp(max=k_round)
        target = p[self.rows, at]  # [b, V]
        if k_round:
            rejected = accepted < k_round
            q_at = q[self.rows, at.clamp(max=k_round - 1)]
            residual = (target - q_at).clamp(min=0)
            mass = residual.sum(-1, keepdim=True)
            residual = torch.where(mass > 0, residual / mass.clamp(min=1e-300), target)
            target = torch.where(rejected[:, None], residual, target)
        return accepted, sample(target, self.generator)

    def _round(self) -> None:
        seqs = self.seqs
        committed, active = seqs.count.clone(), ~seqs.done
        remaining = seqs.remaining()
        k_round = max(0, min(self.K, int(remaining.max()) - 1))
        drafts, q_probs, draft_logits = self._draft(k_round, committed)
        main_tokens = gather_rows(seqs.tokens, (committed - 1)[:, None]
                                  + torch.arange(k_round + 1, device=seqs.device))
        t0 = self.clock()
        hidden = main_forward(self.model, self.caches[0], main_tokens)  # [k+1, b, h]
        logits = self.model.logits(hidden)  # [b, k+1, V]
        if self.K:
            rows = (committed - 1)[:, None] + torch.arange(k_round + 1, device=seqs.device)
            scatter_rows(self.hidden[0], rows, hidden.transpose(0, 1), torch.ones_like(rows,
                                                                                       dtype=torch.bool))
        accepted, final = self._accept(logits, drafts, q_probs)
        _sync(seqs.device)
        self.counts.verify_seconds += self.clock() - t0
        self.counts.main_forwards += 1
        new = torch.cat([drafts, torch.zeros_like(final)[:, None]], 1)
        new[self.rows, accepted] = final
        seqs.commit(new, accepted + 1)
        self.counts.add_round(active, k_round, accepted)
        if self.record:
            self.rounds.append(Round(committed, active, drafts, draft_logits, accepted))
        now = seqs.count
        self.caches[0].commit(now - 1)
        for k in range(1, self.K + 1):
            cache = self.caches[k]
            cache.commit(torch.minimum(now - 1 - k, cache.lengths).clamp(min=0))
