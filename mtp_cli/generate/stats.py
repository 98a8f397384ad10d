"""Acceptance and speed statistics of speculative decoding.

Per depth k: `proposed_k` counts (row, round) pairs in which depth k drafted a token,
`accepted_k` those in which drafts 1..k were all accepted. Unconditional acceptance of depth k
is `accepted_k / proposed_k`; conditional is `accepted_k / accepted_{k-1}` (given the earlier
drafts were accepted; `accepted_0 = proposed_k`). Mean accepted length = tokens a round commits
= 1 + mean drafts accepted (vLLM's convention: 1 + the sum of unconditional rates when every
round drafts K tokens).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SpeculativeCounts:
    depths: int
    rounds: int = 0  # (row, round) pairs
    drafts_accepted: int = 0
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    accepted_given_previous: list[int] = field(default_factory=list)  # accepted_{k-1} counts
    main_forwards: int = 0
    draft_forwards: int = 0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    def __post_init__(self) -> None:
        for name in ("proposed", "accepted", "accepted_given_previous"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.depths)

    def add_round(self, active: torch.Tensor, k_round: int, accepted: torch.Tensor) -> None:
        accepted = accepted[active]
        self.rounds += int(active.sum())
        self.drafts_accepted += int(accepted.sum())
        for k in range(1, k_round + 1):
            self.proposed[k - 1] += int(active.sum())
            self.accepted[k - 1] += int((accepted >= k).sum())
            self.accepted_given_previous[k - 1] += int((accepted >= k - 1).sum())

    def merge(self, other: SpeculativeCounts) -> SpeculativeCounts:
        """The counts of two decodings (batches of one prompt file) as one."""
        summed = {name: getattr(self, name) + getattr(other, name) for name in (
            "rounds", "drafts_accepted", "main_forwards", "draft_forwards", "prefill_seconds",
            "draft_seconds", "verify_seconds")}
        lists = {name: [a + b for a, b in zip(getattr(self, name), getattr(other, name),
                                              strict=True)]
                 for name in ("proposed", "accepted", "accepted_given_previous")}
        return SpeculativeCounts(self.depths, **summed, **lists)

    def as_dict(self) -> dict[str, Any]:
        per_depth = []
        for k in range(self.depths):
            proposed, accepted = self.proposed[k], self.accepted[k]
            given = self.accepted_given_previous[k]
            per_depth.append({
                "depth": k + 1, "proposed": proposed, "accepted": accepted,
                "acceptance_rate": accepted / proposed if proposed else None,
                "conditional_acceptance_rate": accepted / given if given else None,
            })
        mean_drafts = self.drafts_accepted / self.rounds if self.rounds else 0.0
        draft_steps = self.draft_forwards or 1
        return {
            "draft_depths": self.depths, "rounds": self.rounds,
            "mean_accepted_drafts": mean_drafts, "mean_accepted_length": 1 + mean_drafts,
            "per_depth": per_depth, "main_forwards": self.main_forwards,
            "draft_forwards": self.draft_forwards,
            "seconds": {"prefill": self.prefill_seconds, "draft": self.draft_seconds,
                        "verify": self.verify_seconds},
            "draft_step_seconds": self.draft_seconds / draft_steps,
            "verify_step_seconds": self.verify_seconds / max(self.main_forwards - 1, 1),
        }


@dataclass
class SpeedupTiming:
    """Seconds of each timed plain and speculative decoding, in the order they ran, and each
    repetition's ratio plain / speculative."""

    plain: list[float]
    speculative: list[float]

    @property
    def ratios(self) -> list[float]:
        return [p / s if s > 0 else float("inf") for p, s in zip(self.plain, self.speculative,
                                                                 strict=True)]

    @property
    def speedup(self) -> float:
        """The median of the repetitions' ratios: one slow moment on a loaded machine moves
        one ratio, not the figure."""
        return statistics.median(self.ratios)


def interleaved_speedup(plain: Callable[[], float], speculative: Callable[[], float],
                        repeats: int) -> SpeedupTiming:
    """Time `repeats` pairs, plain then speculative in each (each callable decodes once and
    returns its seconds): both modes see the same drift of the machine's speed."""
    timing = SpeedupTiming([], [])
    for _ in range(repeats):
        timing.plain.append(plain())
        timing.speculative.append(speculative())
    return timing
