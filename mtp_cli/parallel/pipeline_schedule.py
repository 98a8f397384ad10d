"""Pipeline-parallel execution of one optimizer step: runs this rank's actions in order.

Why not `torch.distributed.pipelining`: MTP needs the micro-batch's integer data (ids and
positions on the MTP stage, labels and loss mask on the loss stage) on stages other than the
first, which that library only gives to stage 0; and its metadata inference runs extra forwards
on uninitialised tensors, which would feed MTP's loss tracker. Here every stage receives the same
micro-batch from the data loader (as Megatron does) and only hidden states travel.

The order of computations and posts is `pipeline_order.step_order` (1F1B, or interleaved 1F1B
with virtual stages, as Megatron-Core runs them); the posts go through a `PipelineP2P` layer in
batches, paired by order. Received tensors are kept by the message they carry until the
computation that needs them; an output is kept from its forward to its backward (the live
outputs the schedule bounds).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mtp_cli.gpt import GPTModel
from mtp_cli.parallel.pipeline_p2p import PipelineP2P, Post
from mtp_cli.parallel.pipeline_position import PipelinePosition
from mtp_cli.plan.pipeline_order import Action, Compute, Exchange, Message, step_order

# (per-token loss [b, s] of the loss stage, micro-batch) -> the scalar to backpropagate
LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass
class _InFlight:
    received: torch.Tensor | None  # this stage's input (requires grad), None on stage 0
    output: torch.Tensor  # the output sent on, or the scalar loss on the last stage


@dataclass
class StepRecord:
    """What the last step or forward pass ran: (kind, global stage, micro-batch) per
    computation, kind "F" or "B", and the most outputs alive at once."""

    computations: list[tuple[str, int, int]] = field(default_factory=list)
    peak_live_outputs: int = 0


@dataclass
class _StepState:
    micro_batches: Sequence[Any]
    loss_fn: LossFn
    device: torch.device
    train: bool
    received: dict[Message, torch.Tensor] = field(default_factory=dict)
    to_send: dict[Message, torch.Tensor] = field(default_factory=dict)
    in_flight: dict[tuple[int, int], _InFlight] = field(default_factory=dict)
    losses: list[torch.Tensor] = field(default_factory=list)
    record: StepRecord = field(default_factory=StepRecord)


@dataclass
class PipelineSchedule:
    """Runs the micro-batches of one step through this rank's chunks; returns the losses.

    `microbatch_group_size` is Megatron's `microbatch_group_size_per_vp_stage` (None: pp);
    `comm_dtype` the dtype of everything sent (Megatron's `pipeline_dtype`).
    """

    chunks: Sequence[GPTModel]
    position: PipelinePosition
    p2p: PipelineP2P
    microbatch_group_size: int | None = None
    comm_dtype: torch.dtype = torch.float32
    last_record: StepRecord = field(default_factory=StepRecord)

    def __post_init__(self) -> None:
        if len(self.chunks) != self.position.num_chunks:
            raise ValueError(f"{len(self.chunks)} chunks for {self.position.num_chunks} "
                             f"virtual stages on pp_rank {self.position.pp_rank}")

    def step(self, micro_batches: Sequence[Any], loss_fn: LossFn,
             device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Forward and backward every micro-batch; gradients accumulate in the chunks.

        Returns the detached losses computed on the loss stage (empty on other ranks).
        """
        return self._run(micro_batches, loss_fn, torch.device(device), train=True)

    @torch.no_grad()
    def forward_only(self, micro_batches: Sequence[Any], loss_fn: LossFn,
                     device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Forward every micro-batch through every chunk (validation); returns the losses
        computed on the loss stage (empty on other ranks)."""
        return self._run(micro_batches, loss_fn, torch.device(device), train=False)

    def order(self, count: int, *, train: bool = True) -> list[Action]:
        where = self.position
        return step_order(where.pp_size, where.pp_rank, where.num_chunks, count,
                          self.microbatch_group_size, forward_only=not train)

    def _run(self, micro_batches: Sequence[Any], loss_fn: LossFn, device: torch.device, *,
             train: bool) -> list[torch.Tensor]:
        state = _StepState(micro_batches, loss_fn, device, train)
        for action in self.order(len(micro_batches), train=train):
            if isinstance(action, Exchange):
                self._exchange(action, state)
            elif action.backward:
                self._backward(action, state)
            else:
                self._forward(action, state)
        leftover = [*state.received, *state.to_send, *state.in_flight]
        if leftover:
            raise RuntimeError(f"pipeline step ended with unconsumed state: {leftover}")
        self.last_record = state.record
        return state.losses

    def _forward(self, work: Compute, state: _StepState) -> None:
        stage = self.position.stage_index(work.chunk)
        batch = state.micro_batches[work.micro_batch]
        received = None
        if stage > 0:
            received = state.received.pop(Message(stage - 1, work.micro_batch, gradient=False))
            if state.train:
                received.requires_grad_()
        output = self.chunks[work.chunk](
            batch.input_ids, batch.position_ids, labels=batch.labels, loss_mask=batch.loss_mask,
            packed_seq_params=batch.packed_seq_params, hidden_states=received,
        )
        state.record.computations.append(("F", stage, work.micro_batch))
        if self.position.is_last_stage(work.chunk):
            output = state.loss_fn(output, batch)
            state.losses.append(output.detach())
        else:
            state.to_send[Message(stage, work.micro_batch, gradient=False)] = output.detach()
        if state.train:
            state.in_flight[(work.chunk, work.micro_batch)] = _InFlight(received, output)
            state.record.peak_live_outputs = max(state.record.peak_live_outputs,
                                                 len(state.in_flight))

    def _backward(self, work: Compute, state: _StepState) -> None:
        stage = self.position.stage_index(work.chunk)
        flight = state.in_flight.pop((work.chunk, work.micro_batch))
        if self.position.is_last_stage(work.chunk):
            flight.output.backward()
        else:
            grad = state.received.pop(Message(stage, work.micro_batch, gradient=True))
            if flight.output.requires_grad:  # else a first stage train.freeze froze whole
                torch.autograd.backward(flight.output, grad.to(flight.output.dtype))
        state.record.computations.append(("B", stage, work.micro_batch))
        if flight.received is not None:  # stage > 0: its input's gradient goes back
            state.to_send[Message(stage - 1, work.micro_batch, gradient=True)] = \
                flight.received.grad

    def _exchange(self, exchange: Exchange, state: _StepState) -> None:
        """Post one batch; file what arrives under the message it carries."""
        where = self.position
        batch: list[Post] = []
        for slot, message in exchange.slots():
            peer = where.next_rank if slot in ("send_next", "recv_next") else where.prev_rank
            if slot.startswith("send"):
                payload = state.to_send.pop(message).to(self.comm_dtype).contiguous()
                batch.append(Post(True, peer, payload, message))
            else:
                buffer = torch.empty(where.output_shape(message.boundary), dtype=self.comm_dtype,
                                     device=state.device)
                batch.append(Post(False, peer, buffer, message))
        self.p2p.post(batch)
        for post in batch:
            if not post.send:
                state.received[post.message] = post.tensor
