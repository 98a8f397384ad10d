"""Checkpoint state of a model-parallel rank: full tensors under canonical names.

Every tensor-parallel shard is gathered to the single-process tensor, every embedding copy is
checked equal to the first stage's and stored under the main key (`tie_*_state_dict`), and the
optimizer state is flattened per parameter exactly as `torch.distributed.checkpoint.state_dict`
flattens it (`state.<name>.exp_avg`, `param_groups.<name>.lr`). The checkpoint therefore does not
depend on the layout that wrote it: DCP deduplicates the identical entries that several ranks
offer, and any layout - data parallel only, or another tensor x pipeline split - loads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mtp_cli.models.gpt import GPTModel
from mtp_cli.mtp.tying import (
    OUTPUT_LAYER_KEY,
    WORD_EMBEDDING_KEY,
    tie_output_layer_state_dict,
    tie_word_embeddings_state_dict,
)
from mtp_cli.parallel.tensor_parallel import TensorParallelPlan, tensor_parallel_plan

NO_STATE = -1.0  # placeholder optimizer step: the checkpoint had no state for this parameter


def stored_key(chunk: GPTModel, name: str) -> str:
    """The checkpoint key of parameter `name` of `chunk` (a tied output copy -> the embedding)."""
    if name == OUTPUT_LAYER_KEY and chunk.share_embeddings_and_output_weights:
        return WORD_EMBEDDING_KEY
    return name


def is_copy(chunk: GPTModel, name: str) -> bool:
    """Whether `name` is a copy of a weight whose primary lives on the first stage."""
    if name.startswith("embedding.") and not chunk.stage.embedding:
        return True
    return name == OUTPUT_LAYER_KEY and chunk.share_embeddings_and_output_weights


def saved_buffers(chunk: GPTModel) -> dict[str, torch.Tensor]:
    """The persistent buffers a checkpoint carries (MoE routers' `expert_bias`), replicated
    over tensor ranks, by their canonical names."""
    keys = chunk.state_dict(keep_vars=True).keys()
    return {name: buf for name, buf in chunk.named_buffers() if name in keys}


def _plan(chunk: GPTModel) -> TensorParallelPlan | None:
    return tensor_parallel_plan(chunk)


def _gather(chunk: GPTModel, name: str, local: torch.Tensor) -> torch.Tensor:
    plan = _plan(chunk)
    return plan.gather_like_parameter(name, local) if plan is not None else local


def _shard(chunk: GPTModel, name: str, full: torch.Tensor) -> torch.Tensor:
    plan = _plan(chunk)
    return plan.shard_like_parameter(name, full) if plan is not None else full


def _full_shape(chunk: GPTModel, name: str, param: torch.Tensor) -> torch.Size:
    plan = _plan(chunk)
    return plan.full_shapes(chunk).get(name, param.shape) if plan is not None else param.shape


@dataclass
class EmbeddingGroup:
    """The ranks that hold the embedding or a copy, paired by (data, context, tensor) rank."""

    group: dist.ProcessGroup | None
    src: int  # global rank of the member that holds the first stage

    def main_weights(self, chunks: Sequence[GPTModel], position_shape: tuple[int, int] | None
                     ) -> dict[str, torch.Tensor]:
        """This TP rank's shard of the first stage's embedding weights, on every member."""
        main: dict[str, torch.Tensor] = {}
        first = next((c for c in chunks if c.stage.embedding), None)
        word_like = next(p for c in chunks for n, p in c.named_parameters()
                         if stored_key(c, n) == WORD_EMBEDDING_KEY)
        shapes = {WORD_EMBEDDING_KEY: word_like.shape}
        if position_shape is not None:
            shapes["embedding.position_embeddings.weight"] = torch.Size(position_shape)
        for key, shape in shapes.items():
            if first is not None:
                tensor = dict(first.named_parameters())[key].detach().clone()
            else:
                tensor = word_like.new_empty(shape)
            if self.group is not None:
                dist.broadcast(tensor, src=self.src, group=self.group)
            main[key] = tensor
        return main


def full_model_state(chunks: Sequence[GPTModel], embedding: EmbeddingGroup | None,
                     dp_cp_group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    """The single-process state dict of this rank's stages (copies checked, stored once)."""
    holds_copy = any(is_copy(c, n) for c in chunks for n, _ in c.named_parameters())
    main_full: dict[str, torch.Tensor] = {}
    if embedding is not None and (holds_copy or embedding.group is not None):
        position = chunks[0].config
        shape = ((position.max_position_embeddings, position.hidden_size)
                 if position.position_embedding == "learned_absolute" else None)
        local = embedding.main_weights(chunks, shape)
        holders = {stored_key(c, n): (c, n) for c in chunks for n, _ in c.named_parameters()}
        main_full = {key: _gather(*holders[key], value) if key in holders else value
                     for key, value in local.items()}
    state: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        full = {name: _gather(chunk, name, param.detach())
                for name, param in chunk.named_parameters()}
        full.update({name: buf.detach() for name, buf in saved_buffers(chunk).items()})
        if chunk.share_embeddings_and_output_weights and OUTPUT_LAYER_KEY in full:
            tie_output_layer_state_dict(full, main_full[WORD_EMBEDDING_KEY],
                                        dp_cp_group=dp_cp_group)
        elif WORD_EMBEDDING_KEY in full and not chunk.stage.embedding:
            tie_word_embeddings_state_dict(full, main_full[WORD_EMBEDDING_KEY],
                                           dp_cp_group=dp_cp_group)
            for key, value in main_full.items():
                if key != WORD_EMBEDDING_KEY and key in full:
                    tie_word_embeddings_state_dict(full, value, key, copy_key=key)
        state.update(full)
    return state


def _groups_by_param(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def full_optimizer_state(chunks: Sequence[GPTModel], optimizer: torch.optim.Optimizer
                         ) -> dict[str, Any]:
    """The optimizer state flattened per canonical parameter name, moments gathered."""
    groups = _groups_by_param(optimizer)
    flat: dict[str, Any] = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if id(param) not in groups:  # frozen (train.freeze): no optimizer state
                continue
            key = stored_key(chunk, name)
            for item, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() > 0:
                    value = _gather(chunk, name, value)
                flat[f"state.{key}.{item}"] = value
            for hyper, value in groups[id(param)].items():
                if hyper != "params":
                    flat[f"param_groups.{key}.{hyper}"] = value
    return flat


def load_placeholders(chunks: Sequence[GPTModel], optimizer: torch.optim.Optimizer
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full-shaped buffers for DCP to load into (AdamW's state: step and two moments)."""
    model: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            key, shape = stored_key(chunk, name), _full_shape(chunk, name, param)
            model[key] = torch.empty(shape, dtype=param.dtype, device=param.device)
            optim[f"state.{key}.step"] = torch.tensor(NO_STATE)
            for moment in ("exp_avg", "exp_avg_sq"):
                optim[f"state.{key}.{moment}"] = torch.zeros(shape, dtype=param.dtype,
                                                            device=param.device)
        for name, buf in saved_buffers(chunk).items():
            model[name] = torch.empty_like(buf)
    return model, optim


@torch.no_grad()
def load_full_state(chunks: Sequence[GPTModel], optimizer: torch.optim.Optimizer,
                    model_sd: dict[str, Any], optim_sd: dict[str, Any]) -> None:
    """Copy this rank's shards of full tensors into the parameters and the optimizer state."""
    for chunk in chunks:
        for name, buf in saved_buffers(chunk).items():
            buf.copy_(model_sd[name].to(buf.dtype))
        for name, param in chunk.named_parameters():
            key = stored_key(chunk, name)
            param.copy_(_shard(chunk, name, model_sd[key]).to(param.dtype))
            step = optim_sd.get(f"state.{key}.step")
            if step is None or float(step) == NO_STATE:
                continue
            optimizer.state[param] = {
                "step": step.detach().clone().float(),
                **{moment: _shard(chunk, name, optim_sd[f"state.{key}.{moment}"]).clone()
                   for moment in ("exp_avg", "exp_avg_sq")},
            }
