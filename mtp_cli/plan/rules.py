"""Every rule of a run spec beyond the type and bounds of one field, in one place.

The schema (`mtp_cli.config`) checks what one key may hold and fills the defaults; the rules
that tie keys together live here: divisibility (heads, tensor, context, pipeline, batch sizes),
what runs with what (MoE and MLA keys, expert tensor parallel, the TE backend), the layout and
the layer split (`mtp_cli.plan.placement` resolves them), and the rules that need the world size.
Each is checked once: the spec's own rules when it is loaded (`check_spec`, which the loader
runs), the world-size rules when a world size is known (`world_problems`, `unsupported`). Every
rule gives a `Problem` with the key at fault; `located` attaches the file and line the key was
written at (or the override that set it), so there is one error type: `SpecError`.
"""

from __future__ import annotations

from typing import Any

from mtp_cli.config.attention_fields import MLA_KEYS, YARN_KEYS, changed_keys, rotary_dim
from mtp_cli.config.freeze_rules import freeze_problem
from mtp_cli.config.limits import SizeLimitError, check_size_limits
from mtp_cli.config.loader import locate_problems
from mtp_cli.config.moe_fields import MoEFields
from mtp_cli.config.schema import ModelConfig, ParallelConfig, RunSpec, TrainConfig
from mtp_cli.errors import Problem, SpecError
from mtp_cli.plan.placement import PlacementError, build_stage_plan

Rule = tuple[str, str]  # (key relative to its section, message)


def located(spec: RunSpec, problems: list[Problem]) -> SpecError:
    """The one error of a broken rule: each problem at the file and line of its key."""
    return SpecError(problems=locate_problems(problems, spec.source))


# --- checked when a spec is loaded --------------------------------------------------------------
def check_spec(spec: RunSpec) -> None:
    """Every rule of `spec` that needs no world size; `SpecError` with the first problem of each
    section (model, parallel, train), else the first rule across sections. A layout sets
    `parallel.virtual_pipeline` (stages / pipeline) when the spec leaves it out."""
    sections = [("model", model_rules(spec.model)), ("parallel", parallel_rules(spec.parallel)),
                ("train", train_rules(spec.train))]
    problems = [Problem(rules[0][1], key=f"{name}.{rules[0][0]}")
                for name, rules in sections if rules]
    if not problems:
        problem = cross_section_problem(spec)
        problems = [problem] if problem is not None else []
    if problems:
        raise located(spec, problems)


def model_rules(model: ModelConfig) -> list[Rule]:
    """The rules linking the keys of `model:`, in the order they are reported."""
    given = model.given_keys
    if not model.multi_latent_attention and "kv_channels" not in given and \
            model.hidden_size % model.num_attention_heads:
        return [("num_attention_heads",
                 f"num_attention_heads ({model.num_attention_heads}) must divide hidden_size "
                 f"({model.hidden_size}) (or set kv_channels)")]
    if model.num_attention_heads % model.num_query_groups:
        return [("num_query_groups",
                 f"num_query_groups ({model.num_query_groups}) must divide num_attention_heads "
                 f"({model.num_attention_heads})")]
    rules = [*attention_rules(model, given), *moe_rules(model, given)]
    if model.position_embedding == "learned_absolute" and \
            model.max_position_embeddings < model.seq_length:
        rules.append(("max_position_embeddings",
                      f"max_position_embeddings ({model.max_position_embeddings}) is shorter "
                      f"than seq_length ({model.seq_length})"))
    return rules


def attention_rules(model: Any, given: frozenset[str]) -> list[Rule]:
    """The attention keys (after kv_channels and query groups are filled in)."""
    if not model.multi_latent_attention:
        stray = changed_keys(model, given, (*MLA_KEYS, "rope_type", *YARN_KEYS))
        if stray:
            return [(stray[0], f"{stray[0]} is a multi-latent attention key; set "
                               "multi_latent_attention: true")]
        rotated = rotary_dim(model)
        if model.position_embedding == "rope" and model.rotary_percent == 1 and rotated % 2:
            return [("kv_channels", f"RoPE needs an even head width, got {model.kv_channels}")]
        if model.position_embedding == "rope" and (rotated == 0 or rotated % 2):
            return [("rotary_percent", f"RoPE needs an even, non-zero number of rotated channels; "
                                       f"kv_channels x rotary_percent = {model.kv_channels} x "
                                       f"{model.rotary_percent} gives {rotated}")]
        return []
    rules: list[Rule] = []
    if model.position_embedding != "rope":
        rules.append(("position_embedding", "multi-latent attention rotates its decoupled key "
                      "itself: set position_embedding: rope"))
    if "kv_channels" in given and model.kv_channels != model.qk_head_dim + \
            model.qk_pos_emb_head_dim:
        rules.append(("kv_channels", "multi-latent attention has no kv_channels: its heads are "
                      "qk_head_dim + qk_pos_emb_head_dim (query, key) and v_head_dim (value)"))
    if "num_query_groups" in given and model.num_query_groups != model.num_attention_heads:
        rules.append(("num_query_groups", "multi-latent attention has one key/value head per "
                      "query head: leave num_query_groups out"))
    if model.qk_pos_emb_head_dim % 2:
        rules.append(("qk_pos_emb_head_dim", f"RoPE needs an even qk_pos_emb_head_dim, got "
                                             f"{model.qk_pos_emb_head_dim}"))
    if model.rotary_percent != 1.0:
        rules.append(("rotary_percent", "multi-latent attention rotates all "
                      "qk_pos_emb_head_dim channels: leave rotary_percent at 1"))
    if model.rope_type == "yarn" and model.beta_fast <= model.beta_slow:
        rules.append(("beta_fast", f"YaRN needs beta_fast ({model.beta_fast}) > beta_slow "
                                   f"({model.beta_slow})"))
    return rules


def moe_rules(model: Any, given: frozenset[str]) -> list[Rule]:
    """The mixture-of-experts keys, in key order."""
    experts = model.num_moe_experts
    if experts is None:
        set_keys = changed_keys(model, given, tuple(sorted(
            k for k in MoEFields.model_fields if k.startswith("moe_"))))
        return [(set_keys[0], f"{set_keys[0]} needs num_moe_experts")] if set_keys else []
    rules: list[Rule] = []
    freq = model.moe_layer_freq
    if isinstance(freq, list) and len(freq) != model.num_layers:
        rules.append(("moe_layer_freq", f"moe_layer_freq lists {len(freq)} layers, "
                                        f"num_layers is {model.num_layers}"))
    topk = model.moe_router_topk
    if topk > experts:
        rules.append(("moe_router_topk", f"moe_router_topk ({topk}) exceeds num_moe_experts "
                                         f"({experts})"))
    groups, group_topk = model.moe_router_num_groups, model.moe_router_group_topk
    if groups is not None and experts % groups:
        rules.append(("moe_router_num_groups", f"moe_router_num_groups ({groups}) must divide "
                                               f"num_moe_experts ({experts})"))
    if group_topk is not None:
        rules += _group_routing_rules(experts, topk, groups, group_topk)
    if model.moe_router_score_function == "softmax" and topk == 1 \
            and not model.moe_router_pre_softmax:
        rules.append(("moe_router_pre_softmax", "top-1 softmax routing needs "
                      "moe_router_pre_softmax: true (a softmax over one logit has no gradient)"))
    return rules


def _group_routing_rules(experts: int, topk: int, groups: int | None,
                         group_topk: int) -> list[Rule]:
    if groups is None:
        return [("moe_router_group_topk", "group-limited routing needs moe_router_num_groups")]
    if group_topk > groups:
        return [("moe_router_group_topk", f"moe_router_group_topk ({group_topk}) "
                 f"exceeds moe_router_num_groups ({groups})")]
    if group_topk > topk:
        return [("moe_router_group_topk", f"moe_router_group_topk ({group_topk}) "
                 f"exceeds moe_router_topk ({topk}): groups are ranked by their "
                 "top (topk / group_topk) scores")]
    if experts % groups == 0 and topk > group_topk * (experts // groups):
        return [("moe_router_topk", f"moe_router_topk ({topk}) exceeds the experts "
                 f"of {group_topk} groups of {experts // groups}")]
    return []


def parallel_rules(par: ParallelConfig) -> list[Rule]:
    if par.sequence_parallel and par.tensor == 1:
        return [("sequence_parallel", "sequence_parallel needs tensor > 1")]
    return []


def train_rules(train: TrainConfig) -> list[Rule]:
    problem = batch_problem(train, None)
    if problem is not None:
        return [("global_batch_size", problem)]
    if train.min_lr > train.lr:
        return [("min_lr", f"min_lr ({train.min_lr}) exceeds lr ({train.lr})")]
    return []


def batch_problem(train: TrainConfig, dp: int | None) -> str | None:
    """The global batch must be a whole number of micro-batches on every data-parallel rank
    (`dp` None: before the world size is known, one rank's worth)."""
    if dp is None:
        if train.global_batch_size % train.micro_batch_size:
            return (f"global_batch_size ({train.global_batch_size}) must be a multiple of "
                    f"micro_batch_size ({train.micro_batch_size})")
        return None
    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step:
        return (f"global_batch_size ({train.global_batch_size}) must be a multiple of "
                f"micro_batch_size x data-parallel size ({train.micro_batch_size} x {dp} "
                f"= {per_step})")
    return None


def cross_section_problem(spec: RunSpec) -> Problem | None:
    """The first rule across sections: sizes, then divisibility, then placement."""
    try:
        check_size_limits(spec)
    except SizeLimitError as error:
        return Problem(error.message, key=error.key)
    for check in (_tensor_rule, _expert_rules, _sequence_rules, _data_rules, _mtp_rules,
                  _placement_rule, _group_size_rule):
        found = check(spec)
        if found is not None:
            return Problem(found[1], key=found[0])
    return None


def tensor_size_names(model: ModelConfig) -> list[tuple[str, int]]:
    """The model sizes tensor parallel splits (each must divide by `parallel.tensor`)."""
    return [("num_attention_heads", model.num_attention_heads),
            ("num_query_groups", model.num_query_groups),
            ("ffn_hidden_size", model.ffn_hidden_size), ("vocab_size", model.vocab_size)]


def _tensor_rule(spec: RunSpec) -> Rule | None:
    tp = spec.parallel.tensor
    for name, value in tensor_size_names(spec.model):
        if value % tp:
            return "parallel.tensor", f"tensor parallel size {tp} must divide model.{name} ({value})"
    return None


def _expert_rules(spec: RunSpec) -> Rule | None:
    model, par = spec.model, spec.parallel
    moe_ffn = model.moe_ffn_hidden_size or model.ffn_hidden_size
    if par.expert_tensor > 1 and model.num_moe_experts is not None and \
            moe_ffn % par.expert_tensor:
        return "parallel.expert_tensor", (f"expert tensor parallel size {par.expert_tensor} must "
                                          f"divide model.moe_ffn_hidden_size ({moe_ffn})")
    if par.expert > 1 and (model.num_moe_experts or 1) % par.expert:
        return "parallel.expert", (f"expert parallel size {par.expert} must divide "
                                   f"model.num_moe_experts "
                                   f"({model.num_moe_experts or 'unset: no MoE'})")
    return None


def _sequence_rules(spec: RunSpec) -> Rule | None:
    seq, par = spec.model.seq_length, spec.parallel
    if par.context > 1 and seq % (2 * par.context):
        return "parallel.context", (f"model.seq_length ({seq}) must divide by 2 x context "
                                    f"({2 * par.context}) for load-balanced context parallel")
    if par.sequence_parallel and seq % par.tensor:
        return "parallel.sequence_parallel", (f"sequence parallel needs seq_length ({seq}) "
                                              f"divisible by tensor ({par.tensor})")
    return None


def _data_rules(spec: RunSpec) -> Rule | None:
    data, context = spec.data, spec.parallel.context
    if data.blend is not None and data.path is not None:
        return "data.blend", ("give data.path or data.blend, not both (a blend names its "
                              "datasets' paths itself)")
    if data.packed and spec.train.micro_batch_size != 1:
        return "data.packed", (f"data.packed needs train.micro_batch_size 1 (THD packing puts "
                               f"the documents of a micro-batch in one sequence), got "
                               f"{spec.train.micro_batch_size}")
    if data.synthetic is not None:
        found = _synthetic_rule(spec)
        if found is not None:
            return found
    pad = data.pad_documents_to
    if pad is not None and pad % (2 * context):
        return "data.pad_documents_to", (f"data.pad_documents_to ({pad}) must be a multiple of "
                                         f"2 x context ({2 * context})")
    if pad is not None and data.packed and spec.model.seq_length % pad:
        return "data.pad_documents_to", (f"model.seq_length ({spec.model.seq_length}) must "
                                         f"divide by {pad} to pad packed documents")
    return None


def _synthetic_rule(spec: RunSpec) -> Rule | None:
    """A generated task is its own corpus, in bytes, with its own held-out split."""
    data, seq = spec.data, spec.model.seq_length
    synthetic = data.synthetic
    assert synthetic is not None
    if data.path is not None:
        return "data.synthetic", "data.synthetic replaces data.path: set one of them"
    if data.tokenizer is not None:
        return "data.synthetic", "data.synthetic writes bytes: leave data.tokenizer unset"
    length = synthetic.length if synthetic.length is not None else max(1, seq - 1)
    if synthetic.val_documents * (length + 1) < seq + 1:
        return "data.synthetic.val_documents", (
            f"{synthetic.val_documents} held-out documents of {length} tokens (+ end of "
            f"document) are shorter than one window (model.seq_length + 1 = {seq + 1})")
    return None


def _depth_weights_rule(mtp: Any) -> Rule | None:
    """Every weight list names at most D depths (a list for depths that do not exist is a
    mistake, not a no-op)."""
    if mtp.depth_weights is None:
        return None
    lists = [getattr(s, "weights", None) for s in mtp.depth_weights]
    lists = [list(mtp.depth_weights)] if lists and lists[0] is None else lists
    for weights in lists:
        if len(weights) > mtp.num_layers:
            return "mtp.depth_weights", (f"{len(weights)} weights for mtp.num_layers = "
                                         f"{mtp.num_layers} depths")
    return None


def _hsm_rule(spec: RunSpec) -> Rule | None:
    """Hidden-state mixing needs two depths to mix, and every depth's state on one rank's
    whole sequence (Megatron's per-owner mask slicing is not implemented here)."""
    par = spec.parallel
    if spec.mtp.num_layers < 2:
        return "mtp.hsm", f"mtp.hsm needs mtp.num_layers >= 2 (got {spec.mtp.num_layers})"
    if par.context > 1 or par.sequence_parallel or par.pipeline > 1:
        return "mtp.hsm", ("mtp.hsm is implemented without context, sequence or pipeline "
                           "parallel (data and tensor parallel only)")
    return None


def _mtp_rules(spec: RunSpec) -> Rule | None:
    if spec.mtp.use_repeated_layer and spec.mtp.num_layers == 0:
        return "mtp.use_repeated_layer", "use_repeated_layer needs mtp.num_layers >= 1"
    if spec.mtp.distill and spec.mtp.num_layers == 0:
        return "mtp.distill", "needs mtp.num_layers >= 1 (a depth to distil into)"
    if spec.mtp.distill and spec.train.loss.chunked is True:
        return ("train.loss.chunked", "chunked losses never hold the main head's logits that "
                "mtp.distill reads; set it to false or auto (auto chunks nothing while "
                "distilling)")
    found = _depth_weights_rule(spec.mtp)
    if found is not None:
        return found
    if spec.mtp.hsm:
        found = _hsm_rule(spec)
        if found is not None:
            return found
    if spec.mtp.separate_grad_norm and spec.model.num_moe_experts is not None:
        return "mtp.separate_grad_norm", ("a separate MTP gradient norm is not implemented "
                                          "for MoE models (routed experts are normed apart)")
    problem = freeze_problem(spec.train.freeze, tied=spec.model.share_embeddings_and_output_weights,
                             mtp_layers=spec.mtp.num_layers)
    return ("train.freeze", problem) if problem is not None else None


def _placement_rule(spec: RunSpec) -> Rule | None:
    """The layout and layer-split rules (`mtp_cli.plan.placement`); a layout sets
    virtual_pipeline."""
    try:
        plan = build_stage_plan(spec)
    except PlacementError as error:
        return error.field, error.detail
    if plan.from_layout and spec.parallel.virtual_pipeline is None:
        spec.parallel.virtual_pipeline = plan.virtual_pipeline
    return None


def _group_size_rule(spec: RunSpec) -> Rule | None:
    """The rules of microbatch_group_size_per_vp_stage that need no world size (the rest are in
    `world_problems`)."""
    par = spec.parallel
    group = par.microbatch_group_size_per_vp_stage
    key = "parallel.microbatch_group_size_per_vp_stage"
    if group is None:
        return None
    if (par.virtual_pipeline or 1) == 1:
        return key, ("microbatch_group_size_per_vp_stage applies to the interleaved schedule "
                     "only; it needs virtual_pipeline > 1 (or a layout with more stages than "
                     "pipeline ranks)")
    if group < par.pipeline:
        return key, (f"the number of contiguous micro-batches in a virtual pipeline stage "
                     f"({group}) must be at least pipeline ({par.pipeline})")
    return None


# --- checked when the world size is known -------------------------------------------------------
def world_problems(spec: RunSpec, world_size: int) -> list[Problem]:
    """The rules between the spec and `world_size`, first broken one only: the model-parallel
    sizes divide the world, expert parallel divides data x context, the global batch splits
    over the data-parallel ranks, and the interleaved schedule's micro-batch groups fit."""
    par = spec.parallel
    model_parallel = par.tensor * par.pipeline * par.context
    if world_size % model_parallel:
        return [Problem(f"tensor x pipeline x context = {par.tensor} x {par.pipeline} x "
                        f"{par.context} = {model_parallel} does not divide the world size "
                        f"{world_size}", key="parallel", hint="world size = --nproc x --nnodes")]
    dp = world_size // model_parallel
    if (dp * par.context) % par.expert:
        return [Problem(f"expert parallel size {par.expert} must divide data x context = {dp} x "
                        f"{par.context} = {dp * par.context} (the expert group is carved from "
                        "those ranks)", key="parallel.expert",
                        hint="world size = tensor x pipeline x context x data; raise --nproc")]
    problem = batch_problem(spec.train, dp)
    if problem is not None:
        return [Problem(problem, key="train.global_batch_size",
                        hint="change the batch sizes or --nproc")]
    return _group_size_problems(spec, dp)


def _group_size_problems(spec: RunSpec, dp: int) -> list[Problem]:
    """The interleaved schedule's rules on g = microbatch_group_size_per_vp_stage (default:
    pipeline) against M, the micro-batches of a step on a data-parallel rank."""
    par, train = spec.parallel, spec.train
    if (par.virtual_pipeline or 1) == 1:
        return []
    count = train.global_batch_size // (train.micro_batch_size * dp)
    problem = group_size_problem(par.pipeline, count,
                                 par.microbatch_group_size_per_vp_stage or par.pipeline)
    if problem is None:
        return []
    default = "" if par.microbatch_group_size_per_vp_stage else " (g defaults to pipeline)"
    return [Problem(
        f"{problem}{default}; M = global_batch_size / (micro_batch_size x data-parallel "
        f"size) = {train.global_batch_size} / ({train.micro_batch_size} x {dp}) = {count}",
        key="parallel.microbatch_group_size_per_vp_stage",
        hint="change the batch sizes, --nproc or parallel.microbatch_group_size_per_vp_stage")]


def group_size_problem(pp: int, num_microbatches: int, group_size: int) -> str | None:
    """What breaks Megatron-Core's rules on the interleaved schedule's micro-batch group size g
    (`microbatch_group_size_per_vp_stage`) for M micro-batches, or None: pp <= g <= M, and
    M mod g is 0 or at least pp (a smaller last group stalls the pipeline; Megatron refuses it).
    """
    if not pp <= group_size <= num_microbatches:
        return (f"the number of contiguous micro-batches in a virtual pipeline stage "
                f"({group_size}) must range in [pipeline={pp}, M={num_microbatches}]")
    remainder = num_microbatches % group_size
    if 0 < remainder < pp:
        return (f"M ({num_microbatches}) mod microbatch_group_size_per_vp_stage ({group_size}) "
                f"must be 0 or at least pipeline ({pp}), it is {remainder}: a last group "
                f"smaller than the pipeline leaves dependency bubbles")
    return None


def unsupported(spec: RunSpec) -> list[Problem]:
    """Combinations `mtp train` does not run, refused before anything is launched: the TE
    backend under model parallel; expert tensor parallel other than 1 (experts whole) or the
    tensor-parallel size (experts split over the tensor ranks, Megatron-Core's usual setting),
    and then only bias-free."""
    par, model = spec.parallel, spec.model
    problems = []
    if model.backend == "te" and (par.tensor > 1 or par.pipeline > 1 or par.context > 1):
        problems.append(Problem("tensor, pipeline and context parallel run the local backend only",
                                key="model.backend", hint="set model.backend=local"))
    etp, tp = par.expert_tensor, par.tensor
    if etp not in (1, tp):
        problems.append(Problem(
            f"expert tensor parallel size {etp} is not run: parallel.expert_tensor runs at "
            f"1 (routed experts whole on every tensor rank) or at parallel.tensor ({tp}: "
            "routed experts split over the tensor ranks)",
            key="parallel.expert_tensor", hint=f"set parallel.expert_tensor=1 or {tp}"))
    elif etp > 1 and model.add_bias_linear and model.num_moe_experts is not None:
        problems.append(Problem(
            "expert tensor parallel splits bias-free routed experts only (a row-parallel "
            "expert's bias would be added on every tensor rank)",
            key="parallel.expert_tensor",
            hint="set model.add_bias_linear=false or parallel.expert_tensor=1"))
    return problems
