"""The facts `mtp build` shows: the model compiled on the meta device and its counts.

Also `materialize_check`: real weights on the CPU and one forward/backward on random tokens, to
prove a spec trains before a job is launched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mtp_cli.build.counts import ParameterCounts, count_parameters
from mtp_cli.build.model_builder import build_model
from mtp_cli.config.schema import RunSpec
from mtp_cli.models.gpt import GPTModel
from mtp_cli.mtp.run_state import MTPRunState
from mtp_cli.plan.placement import build_stage_plan
from mtp_cli.plan.stages import StagePlan


@dataclass
class BuildDescription:
    spec: RunSpec
    model: GPTModel  # on the meta device
    counts: ParameterCounts
    build_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.spec.model.backend,
            "mtp_depths": self.spec.mtp.num_layers,
            "parameters": self.counts.as_dict(),
            "build_seconds": round(self.build_seconds, 4),
            **self.extra,
        }


def describe_build(spec: RunSpec, *, allow_imports: bool = False) -> BuildDescription:
    """Compile the whole model on the meta device (no weight memory) and count it, then every
    pipeline stage of the plan (`stages`: the plan's fields and the parameters each holds)."""
    start = time.perf_counter()
    model = build_model(spec, "meta", allow_imports=allow_imports)
    plan = build_stage_plan(spec)
    held = stage_parameters(spec, plan, model, allow_imports=allow_imports)
    seconds = time.perf_counter() - start
    stages = [{**entry.as_dict(), "parameters": n} for entry, n in zip(plan.stages, held, strict=True)]
    return BuildDescription(spec=spec, model=model, counts=count_parameters(model),
                       build_seconds=seconds, extra={"stages": stages})


def stage_parameters(spec: RunSpec, plan: StagePlan, whole: GPTModel, *,
                     allow_imports: bool = False) -> list[int]:
    """Parameters each stage holds, tied copies included (each tensor once per stage): what a
    user checks against a device's memory. Stages are built on the meta device."""
    if len(plan.stages) == 1:
        return [sum(p.numel() for p in whole.parameters())]
    counts = []
    for entry in plan.stages:
        stage = build_model(spec, "meta", stage=entry,
                            allow_imports=allow_imports)
        counts.append(sum(p.numel() for p in stage.parameters()))
    return counts


def materialize_check(spec: RunSpec, *, allow_imports: bool = False, batch_size: int = 2,
                      seed: int = 0) -> dict[str, Any]:
    """Build real weights on the CPU and run one forward and backward on random tokens."""
    start = time.perf_counter()
    model = build_model(spec, "cpu", allow_imports=allow_imports)
    built = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    seq = spec.model.seq_length
    tokens = torch.randint(0, spec.model.vocab_size, (batch_size, seq + 1), generator=generator)
    input_ids, labels = tokens[:, :-1], tokens[:, 1:]
    loss_mask = torch.ones_like(labels, dtype=torch.float32)
    model.mtp_state = state = MTPRunState()
    per_token = model(input_ids, None, labels=labels, loss_mask=loss_mask)
    lm_loss = (per_token * loss_mask).sum() / loss_mask.sum()
    lm_loss.backward()
    finished = time.perf_counter()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters()
                       if p.grad is not None)
    mtp_values = state.tracker.get("values")
    mtp_losses = [float(v) for v in mtp_values] if mtp_values is not None else []
    return {
        "lm_loss": float(lm_loss.detach()),
        "mtp_losses": mtp_losses,
        "gradients_finite": bool(grads_finite),
        "build_seconds": round(built - start, 3),
        "forward_backward_seconds": round(finished - built, 3),
    }
