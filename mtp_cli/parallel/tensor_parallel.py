"""Megatron-style tensor parallelism applied from outside to a single-device `GPTModel`.

`parallelize_tensor(model, tp_group)` converts a model built by `build_model` (the whole model
or one pipeline stage) in place. Each module declares its own part beside its class
(`tensor_parallel_rule()`, in the vocabulary of `mtp_cli.nn.sharding`); this transform applies
the rules it finds and names no model class but the embedding and the linears it checks:

    linear_qkv, linear_fc1, eh_proj   column-parallel (rows; SwiGLU's [gate; up] halves apart)
    linear_proj, linear_fc2           row-parallel (input columns; bias replicated)
    MLA: linear_q_proj, linear_q_up_proj, linear_kv_up_proj   column-parallel (by heads)
         linear_q_down_proj, linear_kv_down_proj              duplicated (whole on every rank)
         q_layernorm, kv_layernorm, the shared RoPE key k_pe   replicated
    embedding.word_embeddings         vocab-parallel rows
    output_layer / tied embedding     vocab-parallel rows, vocab-parallel cross-entropy
    norms, position table, row biases replicated (whole)
    routed experts                    whole (expert tensor parallel 1), or with `expert_tensor`
                                      linear_fc1 column / linear_fc2 row over the same ranks,
                                      the dispatcher entering and leaving the region
                                      (`mtp_cli.parallel.expert_tensor`)

Parameters become plain `nn.Parameter`s holding this rank's slice of the full tensor, under the
same names, so `named_parameters()` / `state_dict()` keys are the single-process ones. The
returned `TensorParallelPlan` maps names to shard rules: it slices full tensors (initialisation)
and gathers local ones (comparing in tests), for parameters and for anything shaped like them
(Adam's moments). Checkpoints never gather: they hand DCP each rank's shards
(`mtp_cli.checkpoint.sharded_state`, whose `attach_state_sharders` also makes the MTP layer's
and block's `sharded_state_dict()` offer them).

Sequence parallel (`sequence_parallel=True`) keeps the activations between the TP regions split
along the sequence; replicated parameters then see only this rank's tokens, so their gradients
must be summed over the TP ranks after backward: `sync_sequence_parallel_grads`
(`mtp_cli.parallel.tp_grads`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from mtp_cli.errors import UserError
from mtp_cli.gpt import GPTModel
from mtp_cli.models.embedding import LanguageModelEmbedding
from mtp_cli.models.linear import ColumnParallelLinear, RowParallelLinear
from mtp_cli.nn.sharding import LinearSplit, TensorParallelRule
from mtp_cli.parallel.expert_tensor import ExpertTensorParallelDispatcher
from mtp_cli.parallel.tp_layers import (
    ColumnShardedLinear,
    DuplicatedLinear,
    ExpertShardedLinear,
    RowShardedLinear,
    SharedAcrossHeads,
)
from mtp_cli.parallel.tp_mappings import group_rank, group_size
from mtp_cli.parallel.tp_sharding import COLUMN, GATED_COLUMN, ROW, VOCAB, ShardRule
from mtp_cli.parallel.vocab_parallel import TensorParallelEmbedding, VocabParallelOutputHead

# The shard rule of each column split a module's rule may name.
_COLUMN_RULES = {"column": COLUMN, "gated_column": GATED_COLUMN}
# Name segments that wrappers insert (DDP, torch.compile, activation checkpointing).
_WRAPPER_SEGMENTS = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.")


def canonical_name(name: str) -> str:
    """`name` without the segments wrappers add, e.g. `module.decoder...` -> `decoder...`."""
    for segment in _WRAPPER_SEGMENTS:
        if name.startswith(segment):
            name = name[len(segment):]
        name = name.replace("." + segment, ".")
    return name


@dataclass
class TensorParallelPlan:
    """Which parameters are sharded over `group`, and how (`rules`: global name -> rule).

    Names not in `rules` are replicated: every rank holds the whole tensor.
    """

    group: dist.ProcessGroup | None
    sequence_parallel: bool = False
    rules: dict[str, ShardRule] = field(default_factory=dict)
    expert_tensor: bool = False  # routed experts split over `group` too (ETP = TP)

    @property
    def size(self) -> int:
        return group_size(self.group)

    @property
    def rank(self) -> int:
        return group_rank(self.group)

    def rule(self, name: str) -> ShardRule | None:
        return self.rules.get(canonical_name(name))

    def is_sharded(self, name: str) -> bool:
        return self.rule(name) is not None

    def shard_like_parameter(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a full tensor shaped like parameter `name` (as is if replicated).

        Doubles as `initialize_parameters`' `shard_fn`. Scalars (an optimizer's step) pass as is.
        """
        rule = self.rule(name)
        if rule is None or full.dim() == 0 or self.size == 1:
            return full
        return rule.shard(full, self.rank, self.size)

    def gather_like_parameter(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The full tensor from every rank's local one (a collective over the TP group for
        sharded names: every rank must call it, in the same order)."""
        rule = self.rule(name)
        if rule is None or local.dim() == 0 or self.size == 1:
            return local
        return rule.gather(local, self.group)

    def full_shapes(self, model: nn.Module) -> dict[str, torch.Size]:
        """Global name -> full shape: `initialize_parameters(..., full_shapes=...)`."""
        shapes = {}
        for name, param in model.named_parameters():
            rule = self.rule(name)
            shapes[name] = param.shape if rule is None else rule.full_shape(param.shape, self.size)
        return shapes

    def shard_state_dict(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A full (canonical) state dict -> this rank's, for `model.load_state_dict`."""
        return {k: self.shard_like_parameter(k, v) if isinstance(v, torch.Tensor) else v
                for k, v in full.items()}

    def gather_state_dict(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's state dict -> the full canonical one (collective; same keys on all ranks)."""
        return {k: self.gather_like_parameter(k, v) if isinstance(v, torch.Tensor) else v
                for k, v in local.items()}


def tensor_parallel_plan(model: nn.Module) -> TensorParallelPlan | None:
    """The plan `parallelize_tensor` attached to `model` (through a DDP wrapper too), if any."""
    inner = getattr(model, "module", model)
    return getattr(inner, "tensor_parallel_plan", getattr(model, "tensor_parallel_plan", None))


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict in the canonical layout, equal to the single-process model's
    (collective over the TP group)."""
    state = model.state_dict()
    plan = tensor_parallel_plan(model)
    return state if plan is None else plan.gather_state_dict(state)


def shard_state_dict(model: nn.Module, full: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """`full` (canonical layout, any TP size it came from) sliced for this rank of `model`."""
    plan = tensor_parallel_plan(model)
    return dict(full) if plan is None else plan.shard_state_dict(full)


def _expect(module: nn.Module, expected: type, path: str) -> None:
    if type(module) is not expected:
        raise UserError(
            f"tensor parallel splits the local backend's {expected.__name__} only; "
            f"'{path}' is {type(module).__module__}.{type(module).__name__} "
            "(use model.backend=local and the default linear modules, or parallel.tensor=1)"
        )


def _is_routed_expert(path: str) -> bool:
    """Routed experts stay whole under tensor parallel with expert tensor parallel 1 (as
    DeepSeek-V3 trained; expert parallel splits them by expert instead), and are split by
    `_Converter.routed_expert` with expert tensor parallel = tensor parallel."""
    return ".local_experts." in f".{path}."


class _Converter:
    """Replaces submodules by their sharded versions and records the rules by global name."""

    def __init__(self, model: GPTModel, plan: TensorParallelPlan) -> None:
        self.model, self.plan = model, plan
        self.group, self.sp = plan.group, plan.sequence_parallel

    def _record(self, path: str, module: nn.Module, weight_rule: ShardRule,
                bias_rule: ShardRule | None) -> None:
        self.plan.rules[f"{path}.weight"] = weight_rule
        if bias_rule is not None and getattr(module, "bias", None) is not None:
            self.plan.rules[f"{path}.bias"] = bias_rule

    def column(self, parent: nn.Module, path: str, attr: str, rule: ShardRule,
               gather_output: bool = False) -> None:
        source, full_path = getattr(parent, attr), f"{path}.{attr}"
        _expect(source, ColumnParallelLinear, full_path)
        setattr(parent, attr, ColumnShardedLinear(source, rule, group=self.group,
                                                  sequence_parallel=self.sp,
                                                  gather_output=gather_output))
        self._record(full_path, source, rule, rule)

    def row(self, parent: nn.Module, path: str, attr: str) -> None:
        source, full_path = getattr(parent, attr), f"{path}.{attr}"
        _expect(source, RowParallelLinear, full_path)
        setattr(parent, attr, RowShardedLinear(source, ROW, group=self.group,
                                               sequence_parallel=self.sp))
        self._record(full_path, source, ROW, None)

    def duplicate(self, parent: nn.Module, path: str, attr: str) -> None:
        """Keep a linear whole on every rank (no rule: its parameters are replicated)."""
        source = getattr(parent, attr)
        _expect(source, ColumnParallelLinear, f"{path}.{attr}")
        setattr(parent, attr, DuplicatedLinear(source))

    def split(self, module: nn.Module, path: str, linear: LinearSplit) -> None:
        """One child linear as its module's rule says."""
        if linear.split == "row":
            self.row(module, path, linear.attr)
        elif linear.split == "duplicate":
            self.duplicate(module, path, linear.attr)
        else:
            self.column(module, path, linear.attr, _COLUMN_RULES[linear.split],
                        gather_output=linear.gather_output)

    def routed_expert(self, module: nn.Module, path: str, rule: TensorParallelRule) -> None:
        """Expert tensor parallel: the expert's linears split like a dense MLP's but with no
        communication (the MoE layer's dispatcher enters and leaves the region)."""
        for linear in rule.linears:
            shard = ROW if linear.split == "row" else _COLUMN_RULES[linear.split]
            source, full_path = getattr(module, linear.attr), f"{path}.{linear.attr}"
            _expect(source, RowParallelLinear if shard is ROW else ColumnParallelLinear,
                    full_path)
            setattr(module, linear.attr, ExpertShardedLinear(source, shard, group=self.group))
            self._record(full_path, source, shard, None)

    def apply(self, module: nn.Module, path: str, rule: TensorParallelRule) -> None:
        """What `module`'s own rule asks for (`mtp_cli.nn.sharding`)."""
        if _is_routed_expert(path):
            if self.plan.expert_tensor:  # else whole (ETP 1, DeepSeek-V3's layout)
                self.routed_expert(module, path, rule)
            return
        for linear in rule.linears:
            self.split(module, path, linear)
        if rule.shared_across_heads is not None:
            setattr(module, rule.shared_across_heads, SharedAcrossHeads(self.group, self.sp))
        if rule.expert_dispatcher is not None and self.plan.expert_tensor:
            dispatcher = getattr(module, rule.expert_dispatcher)
            setattr(module, rule.expert_dispatcher,
                    ExpertTensorParallelDispatcher(dispatcher, self.group, self.sp))

    def convert(self) -> None:
        for path, module in list(self.model.named_modules()):
            rule_of = getattr(module, "tensor_parallel_rule", None)
            if callable(rule_of):
                self.apply(module, path, rule_of())
        model = self.model
        if model.embedding is not None:
            _expect(model.embedding, LanguageModelEmbedding, "embedding")
            model.embedding = TensorParallelEmbedding(model.embedding, self.group, self.sp)
            self.plan.rules["embedding.word_embeddings.weight"] = VOCAB
        if model.output_layer is not None:
            weight = model.output_layer.weight
            model.output_layer.weight = nn.Parameter(VOCAB.shard_for(weight.detach(), self.group),
                                                     requires_grad=weight.requires_grad)
            self.plan.rules["output_layer.weight"] = VOCAB
        model.output_head = VocabParallelOutputHead(self.group, self.sp)

    def reject_leftovers(self) -> None:
        """Fail loudly on linears this converter does not know how to split."""
        for path, module in self.model.named_modules():
            if path == "output_layer" or _is_routed_expert(path):
                continue
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) or \
                    type(module).__module__.startswith("transformer_engine"):
                raise UserError(f"tensor parallel does not know how to split '{path}' "
                                f"({type(module).__name__}); use the default module tree")


def parallelize_tensor(model: GPTModel, tp_group: dist.ProcessGroup | None, *,
                       sequence_parallel: bool = False,
                       expert_tensor: bool = False) -> TensorParallelPlan:
    """Shard `model` (whole model or a pipeline stage) over `tp_group`, in place;
    `expert_tensor`: the routed experts too (`parallel.expert_tensor` = `parallel.tensor`).

    Works on real or meta parameters: on the meta device it only reshapes, and
    `initialize_parameters(model, spec, shard_fn=plan.shard_like_parameter,
    full_shapes=plan.full_shapes(model))` then gives every rank its slice of the
    single-process initial weights. A group of size 1 (or None) leaves the model unchanged.
    The plan is also stored as `model.tensor_parallel_plan`.
    """
    if getattr(model, "tensor_parallel_plan", None) is not None:
        raise ValueError("parallelize_tensor: the model is already tensor-parallel")
    size = group_size(tp_group)
    if sequence_parallel and size == 1:  # a spec cannot ask for it (`mtp_cli.plan.rules`)
        raise ValueError("parallelize_tensor: sequence parallel needs a tensor group of size > 1")
    plan = TensorParallelPlan(tp_group, sequence_parallel,
                              expert_tensor=expert_tensor and size > 1)
    if size > 1:  # the sizes divide by `size`: `mtp_cli.plan.rules` checked them at load
        converter = _Converter(model, plan)
        converter.convert()
        converter.reject_leftovers()
    model.tensor_parallel_plan = plan
    return plan
