"""The facts `mtp build` shows: the model compiled on the meta device and its counts.

Also `materialize_check`: real weights on the CPU and one forward/backward on random tokens, to
prove a spec trains before a job is launched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mtp_cli.builders.model_builder import build_model
from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import UserError
from mtp_cli.facts.counts import ParameterCounts, count_parameters, routed_expert_parameters
from mtp_cli.gpt import GPTModel
from mtp_cli.mtp.run_state import MTPRunState
from mtp_cli.plan.placement import build_stage_plan
from mtp_cli.plan.stages import Stage, StagePlan


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
            "mtp_depths": self.model.stage.mtp_layers,  # the whole model: all D
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
    counts = count_parameters(model)
    seconds = time.perf_counter() - start
    stages = [{**entry.as_dict(), **n} for entry, n in zip(plan.stages, held, strict=True)]
    return BuildDescription(spec=spec, model=model, counts=counts,
                            build_seconds=seconds, extra={"stages": stages})


def stage_parameters(spec: RunSpec, plan: StagePlan, whole: GPTModel, *,
                     allow_imports: bool = False) -> list[dict[str, int]]:
    """Per stage: `parameters` it holds, tied copies included (each tensor once per stage),
    what a user checks against a device's memory; its `routed_experts`; and
    `parameters_per_expert_rank`, what one rank holds when `parallel.expert` ranks split the
    routed experts. Counted on the whole meta model's modules a stage builds (`stage_modules`),
    so a 600B model is compiled once, not once per stage."""
    expert_parallel = spec.parallel.expert
    counts = []
    for stage in plan.stages:
        modules, output_copy = stage_modules(whole, stage)
        tensors = {id(p): p for m in modules for p in m.parameters()}
        total = sum(p.numel() for p in tensors.values()) + output_copy
        experts = sum(routed_expert_parameters(m)[0] for m in modules)
        counts.append({"parameters": total, "routed_experts": experts,
                       "parameters_per_expert_rank": total - experts + experts // expert_parallel})
    return counts


def stage_modules(whole: GPTModel, stage: Stage) -> tuple[list[nn.Module], int]:
    """The whole model's modules `build_model(spec, stage=stage)` builds copies of, and the
    parameters of an output weight that is the stage's own copy of the tied word embedding."""
    modules: list[nn.Module] = []
    if stage.needs_embedding:
        modules.append(whole.embedding)
    modules += [whole.decoder.layers[str(n - 1)] for n in stage.decoder_layers]
    if stage.final_layernorm and whole.decoder.final_layernorm is not None:
        modules.append(whole.decoder.final_layernorm)
    if stage.mtp_layers and whole.mtp is not None:
        depths = 1 if whole.mtp.use_repeated_layer else stage.mtp_layers
        modules += [whole.mtp.layer_for_depth(stage.mtp_layer_offset + d) for d in range(depths)]
    output_copy = 0
    if stage.loss:
        if whole.output_layer is not None:
            modules.append(whole.output_layer)
        elif not stage.needs_embedding:  # tied: the loss stage keeps a copy of the embedding
            output_copy = whole.output_weight().numel()
    return modules, output_copy


def available_memory_bytes() -> int | None:
    """The kernel's estimate of memory available without swapping (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_materialize_fits(spec: RunSpec, parameters: int,
                           available: int | None = None) -> None:
    """Refuse, before allocating, a materialisation whose weights and gradients (fp32, 8 bytes a
    parameter) exceed the memory this machine has available: a typo such as
    `hidden_size=10**9` passes the spec's size limits but would otherwise end in the allocator's
    out-of-memory traceback, or in the kernel's OOM killer, after minutes of swapping."""
    available = available_memory_bytes() if available is None else available
    needed = 8 * parameters
    if available is not None and needed > available:
        raise UserError(
            f"--materialize needs at least {needed / 2**30:,.1f} GiB for the weights and "
            f"gradients of {parameters:,} parameters (fp32); this machine has "
            f"{available / 2**30:,.1f} GiB available (the meta-device build needs none: "
            "drop --materialize)")


def materialize_check(spec: RunSpec, *, allow_imports: bool = False, batch_size: int = 2,
                      seed: int = 0, parameters: int | None = None) -> dict[str, Any]:
    """Build real weights on the CPU and run one forward and backward on random tokens.

    `parameters` (the meta build's total) is checked against the available memory first."""
    if parameters is not None:
        check_materialize_fits(spec, parameters)
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
