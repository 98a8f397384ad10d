"""The point-to-point layer of the pipeline: one batch of posts at a time, paired by order.

The schedule hands over a batch of `Post`s (sends with their payload, receives with the buffer
to fill) and waits for all of them before it computes again, as Megatron-Core's
`_batched_p2p_ops` + wait does. Posts carry no tags: NCCL ignores tags and pairs the k-th send
from A to B with B's k-th receive from A, so correctness rests on both sides posting in the same
order (`torch.distributed.batch_isend_irecv` documents the same rule for ops between one pair of
ranks within a batch). gloo pairs untagged messages the same way, so a schedule that is right
under gloo by order is right under NCCL by order; what gloo hides is blocking (its sends return
before the receive is posted), which the trace tests replay under NCCL's rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from mtp_cli.plan.pipeline_order import Message


@dataclass(frozen=True)
class Post:
    """One send (of `tensor`) or receive (into `tensor`) with pipeline rank `peer`."""

    send: bool
    peer: int  # rank in the pipeline group
    tensor: torch.Tensor
    message: Message  # what it carries; for traces and errors, never sent


class PipelineP2P(Protocol):
    """Posts one batch and returns when every post in it has completed."""

    def post(self, batch: Sequence[Post]) -> None: ...


@dataclass
class TorchP2P:
    """Batched isend/irecv on the pipeline process group (any backend)."""

    group: dist.ProcessGroup

    def post(self, batch: Sequence[Post]) -> None:
        if not batch:
            return
        ops = [dist.P2POp(dist.isend if p.send else dist.irecv, p.tensor, group=self.group,
                          group_peer=p.peer) for p in batch]
        for request in dist.batch_isend_irecv(ops):
            request.wait()
