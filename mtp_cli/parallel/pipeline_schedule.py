"""Pipeline-parallel execution of one optimizer step, on torch.distributed point-to-point ops.

Why not `torch.distributed.pipelining`: MTP needs the micro-batch's integer data (ids and
positions on the MTP stage, labels and loss mask on the loss stage) on stages other than the
first, which that library only gives to stage 0; and its metadata inference runs extra forwards
on uninitialised tensors, which would feed MTP's loss tracker. Here every stage receives the same
micro-batch from the data loader (as Megatron does) and only hidden states travel.

Schedules: without virtual stages, 1F1B (warm-up forwards, then one forward / one backward,
then cool-down backwards: at most `pp - rank` micro-batches of activations alive). With virtual
stages, every forward of every chunk, then every backward in reverse chunk order (deadlock-free
for any layout; activations of all micro-batches alive). Messages are tagged per stage,
micro-batch and direction, so their order between two ranks never matters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from mtp_cli.models.gpt import GPTModel

# (per-token loss [b, s] of the loss stage, micro-batch) -> the scalar to backpropagate
LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass
class PipelineLayout:
    """Where this rank sits: its chunks (virtual stages) and how activations are shaped."""

    pp_group: dist.ProcessGroup
    pp_rank: int
    pp_size: int
    num_stages: int  # pp_size x virtual stages
    stage_indices: list[int]  # global stage index of each local chunk, in chunk order
    hidden_shape: tuple[int, int, int]  # [s, b, h] of one micro-batch on this rank
    mtp_stage_index: int | None = None  # stage whose output carries the (1+D) x s MTP rows
    mtp_depths: int = 0

    def rank_of(self, stage_index: int) -> int:
        return stage_index % self.pp_size

    def output_shape(self, stage_index: int) -> tuple[int, int, int]:
        seq, batch, hidden = self.hidden_shape
        carries_mtp = self.mtp_stage_index is not None and stage_index >= self.mtp_stage_index
        return ((1 + self.mtp_depths) * seq if carries_mtp else seq, batch, hidden)


@dataclass
class _InFlight:
    received: torch.Tensor | None  # this stage's input (requires grad), None on stage 0
    output: torch.Tensor  # the output sent on, or the scalar loss on the last stage


@dataclass
class PipelineSchedule:
    """Runs the micro-batches of one step through this rank's chunks; returns the losses."""

    chunks: Sequence[GPTModel]
    layout: PipelineLayout
    comm_dtype: torch.dtype = torch.float32
    _pending_sends: list[Any] = field(default_factory=list)

    def _tag(self, stage_index: int, micro_batch: int, backward: bool, count: int) -> int:
        return 2 * (stage_index * count + micro_batch) + int(backward)

    def _peer(self, stage_index: int) -> int:
        return dist.get_global_rank(self.layout.pp_group, self.layout.rank_of(stage_index))

    def _send(self, tensor: torch.Tensor, stage_index: int, tag: int) -> None:
        payload = tensor.detach().to(self.comm_dtype).contiguous()
        self._pending_sends.append(
            (dist.isend(payload, self._peer(stage_index), self.layout.pp_group, tag), payload)
        )

    def _recv(self, shape: tuple[int, ...], stage_index: int, tag: int,
              device: torch.device) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=self.comm_dtype, device=device)
        dist.recv(buffer, self._peer(stage_index), self.layout.pp_group, tag)
        return buffer

    def _forward(self, chunk: int, index: int, batch: Any, loss_fn: LossFn, count: int,
                 device: torch.device) -> _InFlight:
        stage = self.layout.stage_indices[chunk]
        received = None
        if stage > 0:
            shape = self.layout.output_shape(stage - 1)
            received = self._recv(shape, stage - 1, self._tag(stage - 1, index, False, count),
                                  device).requires_grad_()
        output = self.chunks[chunk](
            batch.input_ids, batch.position_ids, labels=batch.labels, loss_mask=batch.loss_mask,
            packed_seq_params=batch.packed_seq_params, hidden_states=received,
        )
        if stage == self.layout.num_stages - 1:
            return _InFlight(received, loss_fn(output, batch))
        self._send(output, stage + 1, self._tag(stage, index, False, count))
        return _InFlight(received, output)

    def _backward(self, chunk: int, index: int, state: _InFlight, count: int,
                  device: torch.device) -> None:
        stage = self.layout.stage_indices[chunk]
        if stage == self.layout.num_stages - 1:
            state.output.backward()
        else:
            grad = self._recv(tuple(state.output.shape), stage + 1,
                              self._tag(stage, index, True, count), device)
            torch.autograd.backward(state.output, grad.to(state.output.dtype))
        if state.received is not None:  # stage > 0: its input's gradient goes back
            self._send(state.received.grad, stage - 1, self._tag(stage - 1, index, True, count))

    def _order(self, count: int) -> list[tuple[str, int, int]]:
        """(kind, chunk, micro-batch) actions of this rank, in execution order."""
        chunks = len(self.chunks)
        if chunks == 1:  # 1F1B
            warmup = min(self.layout.pp_size - self.layout.pp_rank - 1, count)
            actions = [("F", 0, m) for m in range(warmup)]
            for m in range(warmup, count):
                actions += [("F", 0, m), ("B", 0, m - warmup)]
            return actions + [("B", 0, m) for m in range(count - warmup, count)]
        forwards = [("F", c, m) for c in range(chunks) for m in range(count)]
        backwards = [("B", c, m) for c in reversed(range(chunks)) for m in range(count)]
        return forwards + backwards

    @torch.no_grad()
    def forward_only(self, micro_batches: Sequence[Any], loss_fn: LossFn,
                     device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Forward every micro-batch through every chunk (validation); returns the losses
        computed on the loss stage (empty on other ranks)."""
        device = torch.device(device)
        count = len(micro_batches)
        last = self.layout.num_stages - 1
        losses = []
        for chunk in range(len(self.chunks)):
            for index in range(count):
                state = self._forward(chunk, index, micro_batches[index], loss_fn, count, device)
                if self.layout.stage_indices[chunk] == last:
                    losses.append(state.output)
        self._wait_for_sends()
        return losses

    def _wait_for_sends(self) -> None:
        for request, _ in self._pending_sends:
            request.wait()
        self._pending_sends.clear()

    def step(self, micro_batches: Sequence[Any], loss_fn: LossFn,
             device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Forward and backward every micro-batch; gradients accumulate in the chunks.

        Returns the detached losses computed on the loss stage (empty on other ranks).
        """
        device = torch.device(device)
        count = len(micro_batches)
        in_flight: dict[tuple[int, int], _InFlight] = {}
        losses: list[torch.Tensor] = []
        for kind, chunk, index in self._order(count):
            if kind == "F":
                state = self._forward(chunk, index, micro_batches[index], loss_fn, count, device)
                in_flight[(chunk, index)] = state
                if self.layout.stage_indices[chunk] == self.layout.num_stages - 1:
                    losses.append(state.output.detach())
            else:
                self._backward(chunk, index, in_flight.pop((chunk, index)), count, device)
        self._wait_for_sends()
        return losses
