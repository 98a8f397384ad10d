"""What each pipeline stage's parameters are, for the memory plan: counted on the meta device.

`mtp_cli.plan.memory` is pure arithmetic over these numbers; this module is the one place that
compiles the model (on the meta device, once) to get them.
"""

from __future__ import annotations

from torch import nn

from mtp_cli.builders.model_builder import build_model
from mtp_cli.config.schema import RunSpec
from mtp_cli.facts.counts import routed_expert_parameters
from mtp_cli.facts.describe import stage_modules
from mtp_cli.plan.memory import MemoryPlan, StageCounts, plan_memory
from mtp_cli.plan.placement import build_stage_plan
from mtp_cli.plan.stages import StagePlan

EMBEDDING_TABLES = ("word_embeddings", "position_embeddings")
# 2-D weights tensor parallel keeps whole on every rank (`mtp_cli.parallel.tensor_parallel`):
# MLA's down projections (Megatron-Core's "duplicated" linears) and the MoE routers.
TENSOR_PARALLEL_DUPLICATED = ("linear_q_down_proj", "linear_kv_down_proj", "router")


def duplicated_under_tensor_parallel(name: str) -> bool:
    """Whether parameter `name` is a 2-D weight tensor parallel does not split (by name)."""
    return any(segment in TENSOR_PARALLEL_DUPLICATED for segment in name.split("."))


def _unique(modules: list[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    seen: dict[int, tuple[str, nn.Parameter]] = {}
    for module in modules:
        for name, param in module.named_parameters():
            seen.setdefault(id(param), (name, param))
    return list(seen.values())


def stage_tensors(spec: RunSpec, plan: StagePlan, *, allow_imports: bool = False
                  ) -> list[StageCounts]:
    """Per stage of `plan`, in its order: the counts `StageCounts` describes."""
    whole = build_model(spec, "meta", allow_imports=allow_imports)
    output_numel = whole.output_weight().numel()
    result = []
    for stage in plan.stages:
        modules, output_copy = stage_modules(whole, stage)
        named = _unique(modules)
        matrices = sum(p.numel() for _, p in named if p.ndim >= 2) + output_copy
        vectors = sum(p.numel() for _, p in named if p.ndim < 2)
        tables = sum(p.numel() for n, p in named
                     if p.ndim >= 2 and any(t in n for t in EMBEDDING_TABLES))
        matmul = matrices - tables
        if stage.loss and whole.output_layer is None:  # tied: the output weight is a table
            matmul += output_numel
        experts = sum(routed_expert_parameters(m)[0] for m in modules)
        duplicated = sum(p.numel() for n, p in named
                         if p.ndim >= 2 and duplicated_under_tensor_parallel(n))
        layers = [whole.decoder.layers[str(n - 1)] for n in stage.decoder_layers]
        if stage.mtp_layers and whole.mtp is not None:
            layers += [whole.mtp.layer_for_depth(stage.mtp_layer_offset + d)
                       for d in range(stage.mtp_layers)]
        units = tuple(sum(p.numel() for p in layer.parameters()) for layer in layers)
        largest = max([p.numel() for _, p in named] + [output_copy, 0])
        result.append(StageCounts(matrices, vectors, matmul, experts, units, largest,
                                  duplicated=duplicated))
    return result


def build_memory_plan(spec: RunSpec, world_size: int | None = None, *,
                      device_memory: int | None = None, device: str = "cuda",
                      allow_imports: bool = False) -> MemoryPlan:
    """`mtp build --memory`: the plan of `spec` at `world_size` (default: the smallest world
    its model-parallel sizes allow, data parallel 1)."""
    par = spec.parallel
    world = world_size or par.tensor * par.pipeline * par.context
    plan = build_stage_plan(spec)
    counts = stage_tensors(spec, plan, allow_imports=allow_imports)
    return plan_memory(spec, world, counts, plan, device_memory=device_memory, device=device)
