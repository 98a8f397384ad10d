"""`MicroBatchLoader`: the deterministic, resumable stream of micro-batches of one DP rank.

The global sample stream is the concatenation of epochs; epoch e visits every window once in the
order `torch.randperm(len(dataset), generator=seed + e)` (or in index order for validation).
Global batch g is samples `[g * gbs, (g + 1) * gbs)` of that stream, and sample j of it goes to
data-parallel rank `j // (gbs / dp)`, in order, `micro_batch_size` at a time. So the union over
ranks of global batch g is the same set of samples whatever the data-parallel size, and each
micro-batch is the same group of consecutive samples too (`--nproc 2` and `--nproc 1` see the
same micro-batches). When `global_batch_size` is not given it is taken as
`micro_batch_size * dp_size` (one micro-batch per rank per step), which gives every rank the
same micro-batches as any larger global batch would: the assignment then interleaves ranks.

The state is plain ints: how many micro-batches this rank has drawn, plus the layout it was
drawn with; a state saved at a global-batch boundary can be loaded under a different
data-parallel size or micro-batch size (the stream position is the same global sample).
"""

from __future__ import annotations

import torch

from mtp_cli.data.batch import Batch, packed_batch, plain_batch
from mtp_cli.data.blend import BlendedWindows
from mtp_cli.data.context_parallel import shard_for_context_parallel
from mtp_cli.data.windows import TokenWindows
from mtp_cli.errors import UserError


class MicroBatchLoader:
    """Deterministic, resumable stream of micro-batches for one data-parallel rank."""

    def __init__(self, dataset: TokenWindows | BlendedWindows, *, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, packed: bool = False, cp_rank: int = 0,
                 cp_size: int = 1, global_batch_size: int | None = None, shuffle: bool = True,
                 pad_to_multiple: int | None = None, data_fingerprint: int = 0,
                 allow_data_change: bool = False) -> None:
        if len(dataset) == 0:
            raise UserError("the dataset has no window of model.seq_length + 1 tokens")
        if packed and micro_batch_size != 1:
            raise UserError(f"data.packed needs train.micro_batch_size 1 (THD), got "
                            f"{micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside a data-parallel group of {dp_size}")
        gbs = global_batch_size or micro_batch_size * dp_size
        if gbs % (micro_batch_size * dp_size):
            raise UserError(f"train.global_batch_size ({gbs}) must be a multiple of "
                            f"micro_batch_size x data-parallel size "
                            f"({micro_batch_size} x {dp_size})")
        if cp_size > 1 and dataset.seq_length % (2 * cp_size):
            raise UserError(f"model.seq_length ({dataset.seq_length}) must divide by 2 x "
                            f"parallel.context ({2 * cp_size}) for load-balanced context parallel")
        self.dataset = dataset
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.global_batch_size = gbs
        self.seed, self.shuffle, self.packed = seed, shuffle, packed
        self.cp_rank, self.cp_size, self.pad_to_multiple = cp_rank, cp_size, pad_to_multiple
        self.data_fingerprint, self.allow_data_change = data_fingerprint, allow_data_change
        self.micro_batches = 0  # drawn by this rank so far
        self._orders: dict[int, torch.Tensor] = {}

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            n = len(self.dataset)
            # a blend is in its training order already (data/blend.py)
            shuffle = self.shuffle and not getattr(self.dataset, "shuffles_itself", False)
            # int32 halves the one index that grows with the corpus (the same permutation)
            dtype = torch.int32 if n < 2**31 else torch.int64
            self._orders[epoch] = (
                torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch),
                               dtype=dtype) if shuffle else torch.arange(n, dtype=dtype))
        return self._orders[epoch]

    def global_sample(self, micro_batch: int, offset: int) -> int:
        """Index in the global sample stream of sample `offset` of this rank's `micro_batch`."""
        step, within = divmod(micro_batch, self.micro_batches_per_step)
        per_rank = self.global_batch_size // self.dp_size
        return (step * self.global_batch_size + self.dp_rank * per_rank
                + within * self.micro_batch_size + offset)

    def sample_indices(self, micro_batch: int) -> list[int]:
        """Dataset indices (windows) of this rank's micro-batch number `micro_batch`."""
        n = len(self.dataset)
        indices = []
        for offset in range(self.micro_batch_size):
            epoch, position = divmod(self.global_sample(micro_batch, offset), n)
            indices.append(int(self._order(epoch)[position]))
        return indices

    def batch_for(self, indices: list[int]) -> Batch:
        """The micro-batch of these windows: packed or plain, then this rank's CP shard."""
        windows = self.dataset.windows(indices)
        batch = packed_batch(windows[0], self.dataset.eod) if self.packed else plain_batch(windows)
        if self.cp_size > 1 or self.pad_to_multiple:
            batch = shard_for_context_parallel(batch, self.cp_rank, self.cp_size,
                                               self.pad_to_multiple)
        return batch

    def next_batch(self) -> Batch:
        """The next micro-batch (endless: a new epoch reshuffles with seed + epoch)."""
        batch = self.batch_for(self.sample_indices(self.micro_batches))
        self.micro_batches += 1
        return batch

    def __iter__(self) -> MicroBatchLoader:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def reset(self) -> None:
        """Back to the first micro-batch (validation restarts its stream at every evaluation)."""
        self.micro_batches = 0

    def state_dict(self) -> dict[str, int]:
        """Plain ints: the position (micro-batches drawn, and the epoch/sample it points at)."""
        epoch, position = divmod(self.global_sample(self.micro_batches, 0), len(self.dataset))
        state = {"micro_batches": self.micro_batches, "epoch": epoch, "position": position,
                 "micro_batch_size": self.micro_batch_size, "dp_size": self.dp_size,
                 "global_batch_size": self.global_batch_size}
        if self.data_fingerprint:  # what the position is a position in (datasets.py)
            state["data_fingerprint"] = self.data_fingerprint
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume where `state` left off (see the module docstring for layout changes); on
        changed data, refuse, or restart the stream when `allow_data_change`."""
        stored = int(state.get("data_fingerprint", 0))
        if stored and self.data_fingerprint and stored != self.data_fingerprint:
            if self.allow_data_change:
                self.micro_batches = 0
                return
            raise UserError(
                "the data changed since the checkpoint was written (the files of data.path or "
                "data.blend: their size or modification time, or the blend, the split, the "
                "tokenizer): its data position means nothing now; set data.allow_data_change: "
                "true to restart the data stream, or --overwrite to start afresh")
        drawn = int(state["micro_batches"])
        layout = (int(state["micro_batch_size"]), int(state["dp_size"]),
                  int(state["global_batch_size"]))
        if layout == (self.micro_batch_size, self.dp_size, self.global_batch_size):
            self.micro_batches = drawn
            return
        old_per_step = layout[2] // (layout[0] * layout[1])
        if drawn % old_per_step or layout[2] != self.global_batch_size:
            raise UserError(
                f"cannot resume the data stream: it was saved with micro_batch_size x dp x "
                f"global_batch_size = {layout} at micro-batch {drawn}, now "
                f"{(self.micro_batch_size, self.dp_size, self.global_batch_size)}; only a "
                f"state saved at a step boundary with the same global batch size can move")
        self.micro_batches = drawn // old_per_step * self.micro_batches_per_step
