"""Per-run MTP state: the loss tracker, the cumulative acceptance counts, the autoscaler's scale.

Megatron-Core keeps these as class attributes of `MTPLossLoggingHelper` and `MTPLossAutoScaler`,
so two models in one process share (and disturb) them. Here each run owns an `MTPRunState`; the
Megatron names act on the *current* one:

    state = MTPRunState()
    model.mtp_state = state             # the model's forward saves into it, whatever is current
    with state.activate():              # Megatron's class-level calls act on it
        MTPLossAutoScaler.set_loss_scale(1 / num_microbatches)
        MTPLossLoggingHelper.track_mtp_metrics(step, writer)

Outside any `activate()` the current state is the process's own (`PROCESS_RUN_STATE`), which is
also what a model with `mtp_state = None` uses: plain scripts keep Megatron's behaviour.
The autoscaler captures the state at forward time, so a backward run later (after another
model's forward, or outside `activate()`) still uses its own run's scale.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class MTPRunState:
    """One run's MTP bookkeeping (see the module docstring).

    `tracker`: this iteration's per-depth `values`, `count`, `correct`, `total` (tensors of
    length D) and the `reduce_group` / `avg_group` handles; `cumulative`: acceptance counts since
    the run started (kept in checkpoints); `loss_scale`: what `MTPLossAutoScaler`'s backward seeds
    every MTP loss with.
    """

    tracker: dict[str, Any] = field(default_factory=dict)
    cumulative: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_scale: torch.Tensor | float = 1.0
    # mtp.hsm: the key of this step's mixing draws (train.seed, data-parallel rank, step) and
    # the draws made in it so far; None outside training steps (then a fixed key 0)
    hsm_key: tuple[int, int, int] | None = None
    hsm_draws: int = 0

    def hsm_generator(self, device: torch.device) -> torch.Generator:
        """The next mixing draw's generator: seeded from (key, draw number), so the mask of a
        step's n-th draw is a function of the seed, the data-parallel rank and the step alone:
        the same on every tensor rank, and again after a resume, with nothing stored."""
        seed, rank, step = self.hsm_key or (0, 0, 0)
        generator = torch.Generator(device=device)
        generator.manual_seed(hash_key(seed, rank, step, self.hsm_draws))
        self.hsm_draws += 1
        return generator

    @contextlib.contextmanager
    def activate(self) -> Iterator[MTPRunState]:
        """Make this the current run state (what the Megatron names act on) inside the block."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)

    def set_loss_scale(self, scale: torch.Tensor | float) -> None:
        """`MTPLossAutoScaler.set_loss_scale` for this run."""
        self.loss_scale = scale.detach().clone() if isinstance(scale, torch.Tensor) else scale

    def reset(self) -> None:
        """Forget the tracker and the cumulative counts (a new run)."""
        self.tracker = {}
        self.cumulative = {}


def hash_key(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 over each part): stable across processes."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return (state ^ (state >> 29)) & 0x7FFFFFFFFFFFFFFF


PROCESS_RUN_STATE = MTPRunState()
_CURRENT: contextvars.ContextVar[MTPRunState] = contextvars.ContextVar(
    "mtp_run_state", default=PROCESS_RUN_STATE)


def current_run_state() -> MTPRunState:
    """The run state the Megatron names act on now."""
    return _CURRENT.get()


@contextlib.contextmanager
def using_run_state(state: MTPRunState | None) -> Iterator[MTPRunState]:
    """`state.activate()`, or the current state unchanged when `state` is None."""
    if state is None:
        yield current_run_state()
    else:
        with state.activate():
            yield state
