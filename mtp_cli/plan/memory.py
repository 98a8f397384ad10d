"""Will it fit? The per-rank memory plan of a layout (`mtp build SPEC --memory`). Arithmetic only.

For every pipeline rank (its virtual stages listed), the bytes of one training step's peak, as
the engine keeps them (`mtp_cli.train.engine.TrainingEngine`, `mtp_cli.train.step`, optim.py):

* **parameters** fp32 (bf16 only through autocast: no fp32 master copy, the weights are the
  master); **gradients** fp32; **optimizer** AdamW `exp_avg` and `exp_avg_sq`, fp32.
  Tensor parallel splits matrices (linears, embedding, output weight), not norms and biases;
  expert parallel splits the routed experts; FSDP2 (`parallel.fsdp`, composed with tensor,
  pipeline and context parallel) shards everything a rank holds over data x context.
* **activations**: `mtp_cli.plan.activations` per micro-batch and stage, times the micro-batches
  alive at once, found by walking the rank's pipeline order (`mtp_cli.plan.pipeline_order`:
  1F1B holds at most `pp - r`, interleaved at most `min(M x vpp, 2(pp-r-1) + (vpp-1)g + 1)`
  (chunk, micro-batch) activations), plus the backward's working set (one layer recomputed
  under `recompute: full`, the gradient of the residual stream and of the widest intermediate).
* **logits / loss**: each head (main, and every MTP depth on the loss stage) keeps its fp32
  log-softmax (plain) or a `[tokens]` log-sum-exp (chunked) until backward; the backward of a
  head adds the logits' gradient and then the `[V, h]` weight gradient (plain) or one
  chunk's (chunked).
* **weight cache**: bf16 autocast keeps a bf16 copy of every weight a matmul reads while the
  step's autocast region is open (the gathered, unsharded weights under FSDP2).
* **buffers**, by the gradient synchronisation the engine picks (`gradient_sync`): DDP's
  gradient buckets (a second copy of the gradients; a whole model over several replicas),
  FSDP2's all-gathered TP-local units (each chunk's root - embedding, output - kept through the
  step, two layers in flight) and reduce-scatter, or the step's flattened all-reduce copy (none
  at one replica; the routed experts' own copy first under expert parallel); the optimizer
  step's temporaries (CUDA: a foreach copy of the moments; CPU: the largest tensor, twice).

The rank's total is the largest of five moments: building (meta-device construction: the
shards and this rank's routed experts only, plus the largest whole tensor drawn twice), the
backward peak, the gradient reduction, the optimizer step and
saving a checkpoint (weights and moments, no gradients: each rank's own shards, never
gathered). Figures are bytes; `MemoryPlan.as_dict()` is `mtp build --memory --json`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mtp_cli.config.moe_fields import is_moe_layer
from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import Problem, UserError
from mtp_cli.plan.activations import (
    FP32,
    LayerShape,
    head_saved_bytes,
    head_transient_bytes,
    mtp_layer_bytes,
    norm_bytes,
    transformer_layer_bytes,
)
from mtp_cli.plan.dims import ParallelDims
from mtp_cli.plan.pipeline_order import Compute, step_order
from mtp_cli.plan.stages import Stage, StagePlan

ADAM_MOMENTS = 2
CHUNK_LOGITS = 2**25  # models/chunked_ce.py: one chunk's fp32 logits
CHUNKED_AUTO_MIN_LOGITS = 2**24
MAX_SIZE = 2**60  # bytes: an exabyte, past any device or file
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(text: str, key: str = "--device-memory") -> int:
    """`80GiB` -> bytes (KB/MB/GB decimal, KiB/MiB/GiB binary, plain bytes)."""
    stripped = text.strip().upper().replace(" ", "")
    number = stripped.rstrip("KMGTIB")
    try:
        value = float(number) * _UNITS[stripped[len(number):]]
    except (ValueError, KeyError):
        raise UserError(problems=[Problem(f"{text!r} is not a size like 80GiB or 141GB",
                                          key=key)]) from None
    if not math.isfinite(value) or value > MAX_SIZE:  # nan, inf, 1e400GB
        raise UserError(problems=[Problem(f"{text!r} is not a finite size of at most 2^60 "
                                          "bytes", key=key)])
    if value < 1:
        raise UserError(problems=[Problem("must be at least 1 byte", key=key)])
    return int(value)


@dataclass(frozen=True)
class StageCounts:
    """Parameter counts (elements) of one stage, whole (before any sharding); counted on the
    meta device by `mtp_cli.facts.stage_tensors.stage_tensors`.

    `matrices`: 2-D weights tensor parallel splits (linears, embedding tables, output weight);
    `vectors`: norms and biases, replicated; `matmul_weights`: what autocast casts to bf16 (the
    linears and the output weight, not the embedding tables' lookups); `routed_experts`: the
    routed experts' part of `matrices` (split by expert parallel instead); `units`: the elements
    of each FSDP2 unit (decoder and MTP layers); `largest`: the largest single tensor;
    `duplicated`: the part of `matrices` (and of `matmul_weights`) tensor parallel keeps whole on
    every rank (MLA's down projections, the MoE routers)."""

    matrices: int
    vectors: int
    matmul_weights: int
    routed_experts: int
    units: tuple[int, ...]
    largest: int
    duplicated: int = 0


@dataclass
class StageMemory:
    """One (pp_rank, vp_stage): its parameters and one micro-batch's activations by kind."""

    pp_rank: int
    vp_stage: int | None
    parameters: int  # elements held by this rank (after tensor / expert / FSDP sharding)
    activations: dict[str, float]  # bytes per micro-batch by layer kind
    backward_transient: float  # bytes its backward adds on top of what is saved

    @property
    def activation_bytes(self) -> float:
        return sum(self.activations.values())


@dataclass
class RankMemory:
    """One pipeline rank (all its virtual stages); bytes unless named otherwise."""

    pp_rank: int
    stages: list[StageMemory]
    parameters: float
    gradients: float
    optimizer: float
    master_weights: float
    weight_cache: float
    activations: float  # at the backward peak: alive micro-batches plus the working set
    alive_microbatches: int  # (chunk, micro-batch) activations held at once, at most
    logits: float  # of `activations`: the heads' saved logits/loss state
    buffers: dict[str, float]
    phases: dict[str, float]
    expert_parallel: int = 1

    @property
    def total(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k])

    def as_dict(self) -> dict[str, Any]:
        return {
            "pp_rank": self.pp_rank,
            "stages": [{"vp_stage": s.vp_stage, "parameters": s.parameters,
                        "activations_per_microbatch": {k: round(v) for k, v in
                                                       s.activations.items()}}
                       for s in self.stages],
            "parameters": round(self.parameters), "gradients": round(self.gradients),
            "optimizer": round(self.optimizer), "master_weights": round(self.master_weights),
            "weight_cache": round(self.weight_cache), "activations": round(self.activations),
            "alive_microbatches": self.alive_microbatches, "logits": round(self.logits),
            "buffers": {k: round(v) for k, v in self.buffers.items()},
            "phases": {k: round(v) for k, v in self.phases.items()},
            "peak_phase": self.peak_phase, "total": round(self.total),
        }


@dataclass
class MemoryPlan:
    """Every pipeline rank's memory at a world size, the tightest, and whether it fits."""

    world_size: int
    dims: ParallelDims
    expert_parallel: int
    num_microbatches: int
    engine: str
    ranks: list[RankMemory]
    device_memory: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def tightest(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.total)

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.tightest.total <= self.device_memory

    def as_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "parallel": {**self.dims.as_dict(), "expert": self.expert_parallel},
            "microbatches_per_step": self.num_microbatches,
            "engine": self.engine,
            "ranks": [r.as_dict() for r in self.ranks],
            "tightest_pp_rank": self.tightest.pp_rank,
            "tightest_total": round(self.tightest.total),
            "device_memory": self.device_memory,
            "fits": self.fits,
            "notes": self.notes,
        }


# --- activations of one stage --------------------------------------------------------------------
def _layer_shape(spec: RunSpec, dims: ParallelDims, ffn: int) -> LayerShape:
    m = spec.model
    if m.multi_latent_attention:
        head_dim, value_dim = m.qk_head_dim + m.qk_pos_emb_head_dim, m.v_head_dim
        groups, rope_dim = m.num_attention_heads, m.qk_pos_emb_head_dim
    else:
        head_dim = value_dim = m.kv_channels
        groups = m.num_query_groups
        rope_dim = int(m.kv_channels * m.rotary_percent)
    return LayerShape(
        hidden=m.hidden_size, heads=m.num_attention_heads, query_groups=groups,
        head_dim=head_dim, value_dim=value_dim, ffn=ffn, gated=m.activation == "swiglu",
        rms_norm=m.normalization == "RMSNorm", rope=m.position_embedding == "rope",
        rope_dim=rope_dim, attention_dropout=m.attention_dropout > 0,
        hidden_dropout=m.hidden_dropout > 0, seq_local=m.seq_length // dims.cp, tp=dims.tp,
        sequence_parallel=spec.parallel.sequence_parallel)


def _ffn_width(spec: RunSpec, layer_index: int | None) -> int:
    """Per-token MLP width of decoder layer `layer_index` (None: an MTP layer): dense, or top-k
    routed experts plus the shared experts."""
    m = spec.model
    if m.num_moe_experts is None or (layer_index is not None
                                     and not is_moe_layer(m.moe_layer_freq, layer_index)):
        return m.ffn_hidden_size
    expert = m.moe_ffn_hidden_size or m.ffn_hidden_size
    return m.moe_router_topk * expert + (m.moe_shared_expert_intermediate_size or 0)


def _chunked(spec: RunSpec, tokens: int) -> bool:
    setting = spec.train.loss.chunked
    if setting == "auto":
        return tokens * spec.model.vocab_size > CHUNKED_AUTO_MIN_LOGITS
    return bool(setting)


def stage_activations(spec: RunSpec, dims: ParallelDims, stage: Stage
                      ) -> tuple[dict[str, float], float]:
    """(bytes one micro-batch keeps on `stage`, by kind; bytes its backward adds on top)."""
    m, train = spec.model, spec.train
    act = 2 if train.bf16 else FP32
    recompute = train.recompute
    tokens = train.micro_batch_size * m.seq_length // dims.cp
    sp_div = dims.tp if spec.parallel.sequence_parallel else 1
    h = m.hidden_size
    kinds: dict[str, float] = {}
    layer_sizes = []
    for number in stage.decoder_layers:
        shape = _layer_shape(spec, dims, _ffn_width(spec, number - 1))
        size = transformer_layer_bytes(shape, act, recompute) * tokens
        kinds["decoder"] = kinds.get("decoder", 0.0) + size
        layer_sizes.append((transformer_layer_bytes(shape, act, "none") * tokens, shape))
    if stage.decoder_layers or stage.mtp_layers:
        kinds["inputs"] = tokens * (3 * 8 + (FP32 * _layer_shape(spec, dims, 1).rope_dim
                                             if m.position_embedding == "rope" else 0))
    if stage.final_layernorm and stage.decoder_layers:
        kinds["final_norm"] = norm_bytes(_layer_shape(spec, dims, 1)) * h * tokens / sp_div
    for _ in range(stage.mtp_layers):
        shape = _layer_shape(spec, dims, _ffn_width(spec, None))
        kinds["mtp"] = kinds.get("mtp", 0.0) + mtp_layer_bytes(shape, act, recompute) * tokens
        layer_sizes.append((mtp_layer_bytes(shape, act, "none") * tokens, shape))
    transient = 0.0
    if stage.loss:
        heads = 1 + stage.mtp_depths_in_loss
        vocab = m.vocab_size // dims.tp
        chunked = _chunked(spec, tokens)
        in_forward = heads * h <= tokens  # models/chunked_ce.py: grads_in_forward_fits
        kinds["logits"] = heads * tokens * head_saved_bytes(vocab, h, act, chunked,
                                                            chunked and in_forward)
        if chunked and in_forward:
            kinds["logits"] += heads * vocab * h * FP32  # each head's fp32 weight gradient
        transient = head_transient_bytes(
            vocab, h, act, chunked=chunked, chunk_tokens=max(1, CHUNK_LOGITS // vocab),
            tokens=tokens, bf16=train.bf16, grads_in_forward=chunked and in_forward)
    if layer_sizes:
        full, shape = max(layer_sizes, key=lambda x: x[0])
        working = tokens * (2 * FP32 * h / sp_div + act * shape.ffn * 2 / dims.tp)
        transient = max(transient, working + (full if recompute != "none" else 0.0))
    return kinds, transient


# --- the schedule ----------------------------------------------------------------------------------
def activation_peak(per_chunk: list[float], transient: list[float], pp: int, rank: int,
                    num_microbatches: int, group_size: int | None) -> tuple[float, int]:
    """(highest activation bytes during the step, most (chunk, micro-batch) alive at once),
    walking this rank's pipeline order: a forward adds its chunk's activations, a backward adds
    its working set, then frees them."""
    chunks = len(per_chunk)
    if pp == 1 and chunks == 1:
        return per_chunk[0] + transient[0], 1
    alive: dict[tuple[int, int], float] = {}
    peak, most = 0.0, 0
    for action in step_order(pp, rank, chunks, num_microbatches, group_size):
        if not isinstance(action, Compute):
            continue
        key = (action.chunk, action.micro_batch)
        if not action.backward:
            alive[key] = per_chunk[action.chunk]
            most = max(most, len(alive))
            peak = max(peak, sum(alive.values()))
        else:
            peak = max(peak, sum(alive.values()) + transient[action.chunk])
            alive.pop(key, None)
    return peak, most


# --- the plan ---------------------------------------------------------------------------------------
def gradient_sync(spec: RunSpec, dims: ParallelDims) -> str:
    """How the engine synchronises data-parallel gradients (`TrainingEngine._data_parallel`):
    "fsdp2" with `parallel.fsdp` (composed with tensor / pipeline / context parallel), "ddp"
    for a whole model per rank over several data x context ranks (no expert parallel), and
    otherwise "allreduce" (one coalesced all-reduce after the backward; none at one replica)."""
    if spec.parallel.fsdp:
        return "fsdp2"
    whole = dims.tp == dims.pp == dims.cp == 1
    if dims.dp_cp > 1 and whole and spec.parallel.expert == 1:
        return "ddp"
    return "allreduce"


def plan_memory(spec: RunSpec, world_size: int, counts: list[StageCounts], plan: StagePlan, *,
                device_memory: int | None = None, device: str = "cuda") -> MemoryPlan:
    """The memory plan of `spec` at `world_size` (`counts`: one per stage of `plan`).

    `device` decides the optimizer step's temporaries: "cuda" runs AdamW's foreach path (a copy
    of every moment), "cpu" the per-tensor loop."""
    dims = ParallelDims.from_spec(spec, world_size)
    ep, etp = spec.parallel.expert, spec.parallel.expert_tensor
    engine = gradient_sync(spec, dims)
    count = dims.num_microbatches(spec)
    shard = dims.dp_cp if engine == "fsdp2" else 1
    ranks = []
    for pp_rank in range(dims.pp):
        mine = [i for i, s in enumerate(plan.stages) if s.pp_rank == pp_rank]
        stages = [plan.stages[i] for i in mine]
        stage_counts = [counts[i] for i in mine]
        memories = []
        for stage, c in zip(stages, stage_counts, strict=True):
            kinds, transient = stage_activations(spec, dims, stage)
            local = _local_elements(c, dims.tp, ep, shard, etp)
            memories.append(StageMemory(pp_rank, stage.vp_stage, round(local), kinds, transient))
        ranks.append(_rank_memory(spec, dims, pp_rank, memories, stage_counts, engine, count,
                                  device))
    notes = _notes(spec, dims, engine)
    return MemoryPlan(world_size, dims, ep, count, engine, ranks, device_memory, notes)


def _local_elements(c: StageCounts, tp: int, ep: int, shard: int = 1, etp: int = 1) -> float:
    """Elements a rank holds: dense weights split by TP (`duplicated` ones whole on every TP
    rank) and FSDP2 (`shard` data x context ranks), routed experts by EP, expert tensor
    parallel (`etp`: 1, or TP) and FSDP2 over the `shard / ep` ranks holding the same ones."""
    split = c.matrices - c.routed_experts - c.duplicated
    dense = split / tp + c.duplicated + c.vectors
    return dense / shard + c.routed_experts / ep / etp / max(shard // ep, 1)


def _rank_memory(spec: RunSpec, dims: ParallelDims, pp_rank: int, stages: list[StageMemory],
                 counts: list[StageCounts], engine: str, num_microbatches: int,
                 device: str) -> RankMemory:
    tp, ep = dims.tp, spec.parallel.expert
    experts_split = ep * spec.parallel.expert_tensor  # ranks one expert layer's rows span
    shard = dims.dp_cp if engine == "fsdp2" else 1
    elements = sum(s.parameters for s in stages)
    params = grads = FP32 * elements
    optimizer = ADAM_MOMENTS * FP32 * elements
    matmul = sum((c.matmul_weights - c.routed_experts - c.duplicated) / tp + c.duplicated
                 + c.routed_experts / experts_split for c in counts)
    weight_cache = 0.0
    if spec.train.bf16:
        if spec.train.recompute == "full":  # only the head is cast outside checkpoints
            matmul = min(matmul, spec.model.vocab_size * spec.model.hidden_size / tp)
        weight_cache = 2 * matmul
    per_chunk = [s.activation_bytes for s in stages]
    transient = [s.backward_transient for s in stages]
    activations, alive = activation_peak(per_chunk, transient, dims.pp, pp_rank,
                                         num_microbatches,
                                         spec.parallel.microbatch_group_size_per_vp_stage)
    logits = max(s.activations.get("logits", 0.0) for s in stages)
    buffers: dict[str, float] = {}
    largest = max((c.largest for c in counts), default=0) / tp / shard
    if engine == "ddp":
        buffers["ddp_buckets"] = grads
    elif engine == "fsdp2":  # gathered (TP-local) units: the roots kept, two layers in flight
        unit = max((u for c in counts for u in c.units), default=0) / tp
        roots = sum(c.matrices + c.vectors - sum(c.units) for c in counts) / tp
        buffers["fsdp_gather"] = FP32 * (roots + 2 * unit)
        buffers["fsdp_reduce_scatter"] = FP32 * (roots + unit)
    step_temp = FP32 * elements if device == "cuda" else 2 * FP32 * largest
    buffers["optimizer_step"] = step_temp
    static = params + grads + optimizer + buffers.get("ddp_buckets", 0.0)
    backward = (static + weight_cache + activations + buffers.get("fsdp_gather", 0.0)
                + buffers.get("fsdp_reduce_scatter", 0.0))
    phases = {"backward": backward, "optimizer_step": static + step_temp}
    if engine == "allreduce":  # flattened copies: the experts' first, then the rest's
        experts = (FP32 * sum(c.routed_experts / experts_split for c in counts)
                   if ep > 1 else 0.0)
        dense = grads - experts if dims.dp_cp > 1 else 0.0
        if experts or dense:
            buffers["gradient_allreduce"] = max(experts, dense)
            phases["gradient_reduction"] = static + buffers["gradient_allreduce"]
    phases["build"] = _build_peak(counts, dims, engine, ep, spec.parallel.expert_tensor)
    # Gradients are freed after the step; DCP writes each rank's own shards as they are (never
    # gathered; measured: nothing copied), except a view into a larger storage, which it copies
    # one at a time: SwiGLU's [gate_r; up_r] halves under tensor parallel.
    gated = spec.model.activation == "swiglu" and tp > 1
    buffers["checkpoint_write"] = (FP32 * spec.model.ffn_hidden_size * spec.model.hidden_size
                                   / tp / shard if gated else 0.0)
    phases["checkpoint"] = static - grads + buffers["checkpoint_write"]
    return RankMemory(pp_rank, stages, params, grads, optimizer, 0.0, weight_cache, activations,
                      alive, logits, buffers, phases, ep)


def _build_peak(counts: list[StageCounts], dims: ParallelDims, engine: str, ep: int = 1,
                etp: int = 1) -> float:
    """Meta-device construction (`mtp_cli.parallel.meta_init`): each chunk's parameters are
    allocated at their tensor-parallel local shapes (this rank's routed experts only: expert
    parallel drops the others on the meta device), then initialised one full tensor at a time
    (`randn(shape) * std`: two fp32 copies of the largest whole tensor at most); FSDP2 then
    shards the chunk one layer at a time. DDP's buckets come last."""
    tp, shard = dims.tp, dims.dp_cp if engine == "fsdp2" else 1
    peak = done = 0.0
    for c in counts:
        local = FP32 * _local_elements(c, tp, ep, etp=etp)
        init = 2 * FP32 * c.largest  # the slice is cut after `randn` is freed
        fsdp = FP32 * max((u for u in c.units), default=0) / tp if shard > 1 else 0.0
        peak = max(peak, done + local + max(init, fsdp))
        done += FP32 * _local_elements(c, tp, ep, shard, etp)
    peak = max(peak, done)
    if engine == "ddp":  # the weights and DDP's buckets (no moments before the first step)
        peak = max(peak, 2 * done)
    return peak


def _notes(spec: RunSpec, dims: ParallelDims, engine: str) -> list[str]:
    notes = ["weights are fp32 masters (bf16 only through autocast): no separate master copy"]
    if spec.model.num_moe_experts is not None:
        notes.append(f"routed experts split over parallel.expert = {spec.parallel.expert} "
                     f"ranks (and over parallel.expert_tensor = {spec.parallel.expert_tensor}"
                     f" tensor ranks); their activations assume uniform routing (top-k per "
                     f"token)")
    return notes
