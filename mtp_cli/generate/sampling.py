"""Turning logits into token choices: greedy, or temperature with top-p (nucleus) sampling.

`distribution` is the one place that decides what "the model's distribution" means at a
temperature and top-p; speculative sampling applies it to both the main and the draft logits,
so acceptance compares the same kind of distributions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSettings:
    """temperature 0 = greedy (argmax); top_p in (0, 1] keeps the smallest set of tokens whose
    probability reaches top_p (always at least the most likely one)."""

    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def distribution(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """`[..., V]` logits -> probabilities at the temperature, top-p applied and renormalised
    (computed in float64 so acceptance ratios of near-equal distributions stay exact)."""
    probs = torch.softmax(logits.double() / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly better tokens
        keep_sorted = before < settings.top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `[..., V]` probabilities."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def choose(logits: torch.Tensor, settings: SamplingSettings,
           generator: torch.Generator | None) -> torch.Tensor:
    """The next token for each row of `[..., V]` logits (argmax when greedy)."""
    if settings.greedy:
        return logits.argmax(dim=-1)
    return sample(distribution(logits, settings), generator)
