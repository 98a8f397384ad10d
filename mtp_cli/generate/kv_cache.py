"""The KV cache of one decoding stream: the main model, or one MTP depth.

Rows of a batch advance independently (prompts of different lengths, different numbers of
accepted drafts), so the cache keeps a length per row and writes the new positions of row `b` at
slots `lengths[b], lengths[b] + 1, ...`. A chunk of `s` new positions is right-padded per row:
a row with fewer real positions computes filler positions after them, which no real query sees
(causality) and which the next commit leaves outside the row's length. Rewinding is setting the
lengths back: slots past a row's length are masked and overwritten later, never read.

Keys and values are pre-allocated per layer (`capacity` slots), created on first use with the
dtype and shape the attention hands over: GQA's keys and values per group (`update_kv`), MLA's
compressed latent per token (`update_latent`: `kv_lora_rank + qk_pos_emb_head_dim` values, which
the MLA layer decodes from with its up-projections absorbed, `mtp_cli.models.mla`).
`expanded_mla=True` makes MLA layers cache their per-head keys and values instead, the path
before the compressed cache: kept only as the reference the tests and `benchmarks/mla_cache.py`
compare against.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys/values `[capacity, b, groups, d]` (MLA: latents `[capacity, b, d]`) and
    per-row lengths (committed slots).

    Protocol: `begin(s)` before each forward of `s` new positions per row; the model's attention
    calls `update_kv` (MLA: `update_latent`) once per layer; then `commit(new_lengths)` (or
    `advance(counts)`).
    """

    def __init__(self, batch: int, capacity: int, device: torch.device | str = "cpu", *,
                 expanded_mla: bool = False) -> None:
        self.batch, self.capacity = batch, capacity
        self.device = torch.device(device)
        self.expanded_mla = expanded_mla
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        self._layers: dict[int, tuple[torch.Tensor, ...]] = {}
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
        keys, values = self._store(layer_number, key, value)
        return keys, values, self._mask

    def update_latent(self, layer_number: int, latent: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """MLA: store the `[s, b, d]` latent of the new positions; return `([S, b, d], mask)`."""
        (latents,) = self._store(layer_number, latent)
        return latents, self._mask

    def _store(self, layer_number: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write each `[s, b, ...]` tensor at this forward's slots of its buffer (allocated on
        first use); return every buffer's used slots `[S, b, ...]`."""
        if self._slots is None:
            raise RuntimeError("KVCache.begin() must precede a forward")
        if layer_number not in self._layers:
            self._layers[layer_number] = tuple(
                torch.zeros((self.capacity, self.batch, *t.shape[2:]), dtype=t.dtype,
                            device=t.device) for t in new)
        buffers = self._layers[layer_number]
        for buffer, t in zip(buffers, new, strict=True):
            if self._start is not None:
                buffer[self._start:self._start + t.shape[0]] = t
            else:
                slot_index = self._slots.transpose(0, 1)  # [s, b]
                rows = torch.arange(self.batch, device=t.device)[None, :]
                buffer[slot_index, rows] = t
        return tuple(buffer[:self._used] for buffer in buffers)

    def stored(self, layer_number: int) -> tuple[torch.Tensor, ...]:
        """The buffers of one layer, `[capacity, b, ...]` each (what the cache holds)."""
        return self._layers[layer_number]

    def bytes_per_token(self) -> int:
        """Bytes held per slot and row, summed over the layers stored so far."""
        return sum(t[0, 0].nbytes for buffers in self._layers.values() for t in buffers)

    def commit(self, lengths: torch.Tensor) -> None:
        """Set every row's committed length (advance after a forward, or rewind)."""
        self.lengths = lengths.to(self.device, torch.long).clone()
        self._slots = self._mask = None

    def advance(self, counts: torch.Tensor) -> None:
        self.commit(self.lengths + counts)
