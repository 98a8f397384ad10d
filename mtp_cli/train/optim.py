"""AdamW with Megatron's weight-decay rule, and a warmup + cosine learning-rate schedule.

Weight decay skips biases and 1-D parameters (norm scales), as Megatron-Core does; embeddings
and every other matrix decay. The schedule is a pure function of the optimizer step, so a
resumed run only needs the step to be back on the same curve.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from mtp_cli.config.schema import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and undecayed biases and norm scales."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim <= 1:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters (plain tensors or DTensor shards)."""
    return torch.optim.AdamW(
        parameter_groups(model, train.weight_decay), lr=train.lr,
        betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps,
    )


def lr_at(step: int, train: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based).

    With t = step + 1 steps done after it: linear warmup t/warmup x lr for t <= warmup_steps,
    then a cosine from lr down to min_lr, reached at t = train.decay_steps (default
    train.steps), and min_lr after that (a run extended past its schedule).
    """
    done = step + 1
    if done <= train.warmup_steps:
        return train.lr * done / train.warmup_steps
    span = max((train.decay_steps or train.steps) - train.warmup_steps, 1)
    progress = min((done - train.warmup_steps) / span, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.min_lr + (train.lr - train.min_lr) * cosine


def _multiplier(step: int, train: TrainConfig) -> float:
    return lr_at(step, train) / train.lr


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> LambdaLR:
    """`LambdaLR` following `lr_at`; `scheduler.step()` once per optimizer step."""
    return LambdaLR(optimizer, partial(_multiplier, train=train))


def scheduler_state(scheduler: LambdaLR) -> dict[str, int]:
    """What a checkpoint needs of the schedule: the step it is at."""
    return {"last_epoch": int(scheduler.last_epoch)}


def load_scheduler_state(scheduler: LambdaLR, state: dict[str, int]) -> None:
    """Put the schedule back at a saved step and set the optimizer's learning rates to it."""
    step = int(state["last_epoch"])
    scheduler.last_epoch = step
    scheduler._step_count = step + 1
    lrs = [base * lam(step) for base, lam in zip(scheduler.base_lrs, scheduler.lr_lambdas,
                                                  strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
