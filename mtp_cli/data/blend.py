"""Weighted blends of datasets (`data.blend`), as Megatron-Core's `BlendedDataset` builds them.

Sample k of the blend is drawn from the dataset with the largest shortfall `w_i * n - c_i`
(`n = max(k, 1)`, `c_i` its samples so far; ties go to the lower index), the rule and the
details of `build_blending_indices` in Megatron-Core 0.19.2's `datasets/helpers.cpp`. So every
prefix of n samples holds within 2 of `w_i * n` samples of dataset i, whatever n, and the
assignment of sample k never depends on the blend's length: a resume with more steps, or any
data-parallel layout, reads the same samples.

Each dataset's c-th sample is window `perm[c mod len]` of that dataset, the permutation drawn
afresh for every pass over it (`seed`, the dataset's place in the blend and the pass number), so
an oversampled dataset repeats in a new order and an undersampled one is drawn from all of it.
The blend itself is in training order already: the loader does not shuffle it again
(`shuffles_itself`), which would break the prefix property. Validation blends the datasets'
own validation splits with the same weights, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtp_cli.data.windows import TokenWindows


def normalized(weights: list[float]) -> list[float]:
    """Weights that sum to 1 (as Megatron's `normalize`)."""
    total = sum(weights)
    return [w / total for w in weights]


def blending_indices(weights: list[float], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(dataset_index [size] int16, dataset_sample_index [size] int64)`: the largest-shortfall
    rule above, literally as helpers.cpp's loop (weights normalised first)."""
    weights = normalized(weights)
    counts = [0] * len(weights)
    chosen, within = [0] * size, [0] * size
    pairs = list(enumerate(weights))
    for k in range(size):
        n = float(max(k, 1))
        best, best_error = 0, weights[0] * n - counts[0]
        for i, w in pairs[1:]:
            error = w * n - counts[i]
            if error > best_error:
                best, best_error = i, error
        chosen[k], within[k] = best, counts[best]
        counts[best] += 1
    return torch.tensor(chosen, dtype=torch.int16), torch.tensor(within, dtype=torch.int64)


@dataclass(frozen=True)
class BlendPart:
    """One dataset of a blend: where it came from, its weight, its windows."""

    source: str
    weight: float
    windows: TokenWindows


class BlendedWindows:
    """`size` samples drawn from `parts` by weight (a map-style dataset like `TokenWindows`)."""

    shuffles_itself = True

    def __init__(self, parts: list[BlendPart], size: int, *, seed: int, shuffle: bool,
                 indices: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.parts = parts
        self.seed, self.shuffle = seed, shuffle
        self.seq_length = parts[0].windows.seq_length
        self.eod = parts[0].windows.eod
        self.dataset_index, self.sample_index = indices or blending_indices(
            [p.weight for p in parts], size)
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.dataset_index)

    @property
    def num_tokens(self) -> int:
        return sum(p.windows.num_tokens for p in self.parts)

    @property
    def num_documents(self) -> int:
        return sum(p.windows.num_documents for p in self.parts)

    def fractions(self, samples: int | None = None) -> list[float]:
        """The share of the first `samples` (default: all) that each dataset contributed."""
        chosen = self.dataset_index[:samples].to(torch.int64)
        counts = torch.bincount(chosen, minlength=len(self.parts)).tolist()
        return [c / max(len(chosen), 1) for c in counts]

    def record(self, samples: int) -> dict[str, dict[str, float]]:
        """`{source: {"weight", "fraction"}}` over the first `samples`: what metrics.jsonl's
        first line of a run says about the blend."""
        total = sum(p.weight for p in self.parts)
        return {p.source: {"weight": p.weight / total, "fraction": share}
                for p, share in zip(self.parts, self.fractions(samples), strict=True)}

    def _window(self, part: int, sample: int) -> int:
        length = len(self.parts[part].windows)
        epoch, position = divmod(sample, length)
        if not self.shuffle:
            return position
        key = (part, epoch)
        if key not in self._perms:
            if len(self._perms) > 2 * len(self.parts):
                self._perms.pop(next(iter(self._perms)))
            generator = torch.Generator().manual_seed(self.seed + 1_000_003 * (part + 1) + epoch)
            self._perms[key] = torch.randperm(length, generator=generator)
        return int(self._perms[key][position])

    def __getitem__(self, index: int) -> torch.Tensor:
        """Blended sample `index`: `[seq_length + 1]` int64 tokens."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        part = int(self.dataset_index[index])
        return self.parts[part].windows[self._window(part, int(self.sample_index[index]))]

    def windows(self, indices: list[int]) -> torch.Tensor:
        """`[len(indices), seq_length + 1]` int64."""
        return torch.stack([self[i] for i in indices])
