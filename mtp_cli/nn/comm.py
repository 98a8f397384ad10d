"""The communication the model's forward and loss need, as a protocol: single-device by default.

Model code is single-device code. The few places where a parallel layout needs a collective
inside the forward or the loss - the context-parallel roll's boundary exchange, the statistics of
a vocab-sharded cross-entropy, the loss and token-count sums, the MTP tracker's reductions, the
tied-copy checks - call a `ModelComm` instead of `torch.distributed`. Process groups are opaque
handles (`Group`) that the model passes back to the comm it was given; it never looks inside.

`LOCAL_COMM` is the single-device implementation (every group has one member, nothing moves).
This module is the floor below `models/` and `mtp/` and imports nothing above it: the
torch.distributed implementation is injected from above. `mtp_cli.parallel` injects it at the
model's seams (`GPTModel.groups.comm`, the output head's `comm`), the way it injects the
vocab-parallel output head, and installs it (`install_group_comm`) for the Megatron-named
functions that take a raw group (`roll_tensor(..., cp_group)`, `tie_*_state_dict(..., tp_group,
dp_cp_group)`, `MTPLossLoggingHelper.save_loss_to_tracker(..., reduce_group, avg_group)`), which
find the comm for their group with `comm_for`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

Group = Any  # an opaque process-group handle; only a ModelComm interprets it
ReduceOp = Literal["sum", "avg", "max", "min"]


@runtime_checkable
class ModelComm(Protocol):
    """The collectives the model's forward and loss path may need, over an opaque group."""

    def size(self, group: Group) -> int:
        """Members of `group`."""
        ...

    def rank(self, group: Group) -> int:
        """This process's index in `group`."""
        ...

    def all_reduce(self, tensor: torch.Tensor, group: Group, op: ReduceOp = "sum"
                   ) -> torch.Tensor:
        """Reduce `tensor` in place over `group`; returns it."""
        ...

    def all_gather(self, tensor: torch.Tensor, group: Group) -> list[torch.Tensor]:
        """Every member's `tensor` (same shape everywhere), in group-rank order."""
        ...

    def broadcast(self, tensor: torch.Tensor, group: Group, src: int = 0) -> torch.Tensor:
        """Overwrite `tensor` in place with group-rank `src`'s; returns it."""
        ...

    def exchange_with_neighbours(self, to_prev: torch.Tensor, to_next: torch.Tensor,
                                 group: Group) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Send `to_prev` to rank r-1 and `to_next` to rank r+1 (no wrap-around); returns
        `(from_next, from_prev)`: what rank r+1 sent back (shaped like `to_prev`) and what rank
        r-1 sent (shaped like `to_next`), None at the ends of the group."""
        ...


class LocalComm:
    """One device: every group has one member and every collective is the identity."""

    def size(self, group: Group) -> int:
        return 1

    def rank(self, group: Group) -> int:
        return 0

    def all_reduce(self, tensor: torch.Tensor, group: Group, op: ReduceOp = "sum"
                   ) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor, group: Group) -> list[torch.Tensor]:
        return [tensor]

    def broadcast(self, tensor: torch.Tensor, group: Group, src: int = 0) -> torch.Tensor:
        return tensor

    def exchange_with_neighbours(self, to_prev: torch.Tensor, to_next: torch.Tensor,
                                 group: Group) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return None, None


LOCAL_COMM = LocalComm()
_group_comm: ModelComm | None = None


def install_group_comm(comm: ModelComm) -> None:
    """The comm that `comm_for` gives a group passed without one (the torch.distributed comm,
    installed by `mtp_cli.parallel` when it is imported)."""
    global _group_comm
    _group_comm = comm


def comm_for(group: Group, comm: ModelComm | None = None) -> ModelComm:
    """`comm` if given; else the single-device comm for no group, the installed one otherwise.

    A group with no comm given and none installed is a caller's mistake (a process group made
    without `mtp_cli.parallel`): it fails here rather than at the first collective.
    """
    if comm is not None:
        return comm
    if group is None:
        return LOCAL_COMM
    if _group_comm is None:
        raise RuntimeError("a process group was given without a ModelComm and none is installed: "
                           "pass comm=, or import mtp_cli.parallel.comm first (it installs the "
                           "torch.distributed one)")
    return _group_comm


@dataclass
class ParallelGroups:
    """The process-group handles the model's forward needs (None = not parallel along that axis)
    and the comm that understands them (None: `comm_for` each group).

    `GPTModel.groups` holds one, shared with its MTP layers; the parallel transforms fill it.
    """

    cp_group: Group = None
    pp_group: Group = None
    dp_cp_group: Group = None
    comm: ModelComm | None = None
    # The ranks whose tokens together make one replica's micro-batch (Megatron's `tp_cp_group`,
    # over which the MoE router sums its token counts): context x tensor under sequence
    # parallel; without it the tensor ranks hold the same tokens, so just the context ranks.
    tp_cp_group: Group = None


def is_parallel(group: Group, comm: ModelComm | None = None) -> bool:
    """Whether `group` has more than one member (None never has)."""
    return group is not None and comm_for(group, comm).size(group) > 1
