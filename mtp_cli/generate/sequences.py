"""The token sequences of a decoding batch: committed tokens per row, limits, stops, streaming.

Row `b` holds `count[b]` committed tokens (its prompt, then what was generated) in
`tokens[b, :count[b]]`; slots past that are scratch (speculative drafts). A row is done when it
produced an end-of-document token (kept as its last token), reached `max_new_tokens`, or filled
the model's maximum positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

OnTokens = Callable[[int, list[int]], None]  # (row, newly committed token ids)


class Sequences:
    def __init__(self, prompts: list[torch.Tensor], max_new_tokens: int, max_positions: int,
                 eod: int | None, device: torch.device, scratch: int = 0,
                 on_tokens: OnTokens | None = None) -> None:
        self.batch = len(prompts)
        self.device = device
        self.prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long,
                                           device=device)
        self.limit = (self.prompt_lengths + max_new_tokens).clamp(max=max_positions)
        self.capacity = int(self.limit.max()) + scratch + 1
        self.tokens = torch.zeros(self.batch, self.capacity, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            self.tokens[row, :len(prompt)] = prompt.to(device)
        self.count = self.prompt_lengths.clone()
        self.eod = eod
        self.done = self.count >= self.limit
        self.on_tokens = on_tokens

    @property
    def all_done(self) -> bool:
        return bool(self.done.all())

    def remaining(self) -> torch.Tensor:
        """Tokens each row may still commit (0 when done)."""
        return torch.where(self.done, 0, self.limit - self.count)

    def commit(self, new: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Append `new[b, :lengths[b]]` to each row that is not done, cut at the limit and after
        an end-of-document token. Returns the number committed per row."""
        lengths = torch.minimum(lengths, self.remaining())
        if self.eod is not None and new.numel():
            positions = torch.arange(new.shape[1], device=new.device)[None, :]
            is_eod = (new == self.eod) & (positions < lengths[:, None])
            first = torch.where(is_eod.any(1), is_eod.float().argmax(1) + 1, lengths)
            stopped = is_eod.any(1)
            lengths = torch.minimum(lengths, first)
        else:
            stopped = torch.zeros_like(self.done)
        for row in range(self.batch):
            n = int(lengths[row])
            if n <= 0:
                continue
            start = int(self.count[row])
            self.tokens[row, start:start + n] = new[row, :n]
            if self.on_tokens is not None:
                self.on_tokens(row, new[row, :n].tolist())
        self.count = self.count + lengths
        self.done = self.done | stopped | (self.count >= self.limit)
        return lengths

    def generated(self) -> list[list[int]]:
        """The generated ids of every row (the end-of-document token included when produced)."""
        return [self.tokens[row, int(self.prompt_lengths[row]):int(self.count[row])].tolist()
                for row in range(self.batch)]
