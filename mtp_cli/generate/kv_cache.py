"""The KV cache of one decoding stream: the main model, or one MTP depth.

Rows of a batch advance independently (prompts of different lengths, different numbers of
accepted drafts), so the cache keeps a length per row and writes the new positions of row `b` at
slots `lengths[b], lengths[b] + 1, ...`. A chunk of `s` new positions is right-padded per row:
a row with fewer real positions computes filler positions after them, which no real query sees
(causality) and which the next commit leaves outside the row's length. Rewinding is setting the
lengths back: slots past a row's length are masked and overwritten later, never read.

Keys and values are pre-allocated per layer (`capacity` slots), created on first use with the
dtype and shape the attention hands over (GQA groups, MLA's per-head keys alike).
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys/values `[capacity, b, groups, d]` and per-row lengths (committed slots).

    Protocol: `begin(s)` before each forward of `s` new positions per row; the model's attention
    calls `update_kv` once per layer; then `commit(new_lengths)` (or `advance(counts)`).
    """

    def __init__(self, batch: int, capacity: int, device: torch.device | str = "cpu") -> None:
        self.batch, self.capacity = batch, capacity
        self.device = torch.device(device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._slots: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._start: int | None = None
        self._used = 0

    def positions(self, s: int) -> torch.Tensor:
        """`[b, s]` slot (= row) indices of the next `s` positions of every row."""
        return self.lengths[:, None] + torch.arange(s, device=self.device)

    def begin(self, s: int) -> torch.Tensor:
        """Prepare a forward of `s` new positions per row; returns their slots `[b, s]`."""
        slots = self.positions(s)
        self._used = min(int(slots.max()) + 1, self.capacity)
        self._slots = slots.clamp(max=self.capacity - 1)
        # every row at the same length (batch 1, or a batch in step): slices, one mask row
        first = int(self.lengths[0])
        uniform = bool((self.lengths == first).all()) and first + s <= self.capacity
        self._start = first if uniform else None
        keys = torch.arange(self._used, device=self.device)
        rows = slots[:1] if uniform else slots
        # query i of row b sees slots 0 .. lengths[b] + i (True = masked)
        self._mask = (keys[None, None, :] > rows[:, :, None])[:, None]  # [b or 1, 1, s, S]
        return slots

    def update_kv(self, layer_number: int, key: torch.Tensor, value: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._slots is None:
            raise RuntimeError("KVCache.begin() must precede a forward")
        if layer_number not in self._layers:
            shape_k = (self.capacity, self.batch, *key.shape[2:])
            shape_v = (self.capacity, self.batch, *value.shape[2:])
            self._layers[layer_number] = (
                torch.zeros(shape_k, dtype=key.dtype, device=key.device),
                torch.zeros(shape_v, dtype=value.dtype, device=value.device))
        keys, values = self._layers[layer_number]
        if self._start is not None:
            keys[self._start:self._start + key.shape[0]] = key
            values[self._start:self._start + key.shape[0]] = value
        else:
            slot_index = self._slots.transpose(0, 1)  # [s, b]
            rows = torch.arange(self.batch, device=key.device)[None, :]
            keys[slot_index, rows] = key
            values[slot_index, rows] = value
        used = self._used
        return keys[:used], values[:used], self._mask

    def commit(self, lengths: torch.Tensor) -> None:
        """Set every row's committed length (advance after a forward, or rewind)."""
        self.lengths = lengths.to(self.device, torch.long).clone()
        self._slots = self._mask = None

    def advance(self, counts: torch.Tensor) -> None:
        self.commit(self.lengths + counts)
