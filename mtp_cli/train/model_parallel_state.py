"""Checkpoint state of a rank: its own shards under canonical names, for every layout.

No tensor is gathered: every tensor-parallel-sharded or FSDP2-sharded parameter and Adam
moment reaches DCP as this rank's local shards of the canonical global tensor
(`parallel.sharded_state`); every embedding copy is checked equal to the first stage's and left
to the first stage to store (`tie_*_state_dict`, on local shards); persistent buffers (MoE
routers' expert biases) go as they are; and the optimizer state is flattened per parameter
exactly as `torch.distributed.checkpoint.state_dict` flattens it (`state.<name>.exp_avg`,
`param_groups.<name>.lr`). The checkpoint therefore does not depend on the layout that wrote
it: DCP writes each chunk once (data-parallel replicas offer the same chunks), and any layout
loads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mtp_cli.checkpoint.sharded_state import local_tensor, sharded_tensor
from mtp_cli.gpt import GPTModel
from mtp_cli.mtp.tying import (
    OUTPUT_LAYER_KEY,
    WORD_EMBEDDING_KEY,
    tie_output_layer_state_dict,
    tie_word_embeddings_state_dict,
)
from mtp_cli.parallel.fsdp_local import fsdp_coordinates, fsdp_rows, held, like
from mtp_cli.parallel.tensor_parallel import tensor_parallel_plan
from mtp_cli.parallel.tp_sharding import ShardRule

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


def _rule(chunk: GPTModel, name: str) -> tuple[ShardRule | None, int, int]:
    """(rule, TP rank, TP size) of parameter `name`; rule None when replicated over TP."""
    plan = tensor_parallel_plan(chunk)
    if plan is None or plan.size == 1:
        return None, 0, 1
    return plan.rule(name), plan.rank, plan.size


def offer(chunk: GPTModel, name: str, value: torch.Tensor,
          layout: torch.Tensor | None = None) -> torch.Tensor:
    """What DCP gets for `value` (parameter `name`'s value or a tensor shaped like it, laid out
    like `layout`, default itself): the held shards as they are (views, no copy) when sharded
    over TP or FSDP2, the tensor when replicated."""
    layout = value if layout is None else layout
    rule, tp_rank, tp_size = _rule(chunk, name)
    dp_rank, dp_size = fsdp_coordinates(layout)
    if layout.dim() == 0 or (rule is None and dp_size == 1):
        return held(value)
    return sharded_tensor(held(value), rule, tp_rank, tp_size, tp_shape=layout.shape,
                          dp_rank=dp_rank, dp_size=dp_size)


def take(value: torch.Tensor) -> torch.Tensor:
    """This rank's held tensor back from what `offer` made (after DCP loaded into it)."""
    return local_tensor(value)


@dataclass
class EmbeddingGroup:
    """The ranks that hold the embedding or a copy, paired by (data, context, tensor) rank."""

    group: dist.ProcessGroup | None
    src: int  # global rank of the member that holds the first stage

    def main_weights(self, chunks: Sequence[GPTModel], position_shape: tuple[int, int] | None
                     ) -> dict[str, torch.Tensor]:
        """This rank's part (TP shard, FSDP2 rows) of the first stage's embedding weights, on
        every member (members share their TP and FSDP coordinates)."""
        main: dict[str, torch.Tensor] = {}
        first = next((c for c in chunks if c.stage.embedding), None)
        word_like = next(p for c in chunks for n, p in c.named_parameters()
                         if stored_key(c, n) == WORD_EMBEDDING_KEY)
        shapes = {WORD_EMBEDDING_KEY: held(word_like).shape}
        if position_shape is not None:  # FSDP2's rows of it where the model is FSDP-sharded
            start, end = fsdp_rows(position_shape[0], *fsdp_coordinates(word_like))
            shapes["embedding.position_embeddings.weight"] = torch.Size(
                (end - start, position_shape[1]))
        for key, shape in shapes.items():
            if first is not None:
                tensor = held(dict(first.named_parameters())[key].detach()).clone()
            else:
                tensor = held(word_like).new_empty(shape)
            if self.group is not None:
                dist.broadcast(tensor, src=self.src, group=self.group)
            main[key] = tensor
        return main


def check_copies(chunks: Sequence[GPTModel], embedding: EmbeddingGroup | None,
                 dp_cp_group: dist.ProcessGroup | None) -> None:
    """Assert every embedding copy on this rank equals the first stage's weight, shard by shard
    (`tie_*_state_dict` on this TP rank's slices: the embedding group pairs equal TP ranks)."""
    holds_copy = any(is_copy(c, n) for c in chunks for n, _ in c.named_parameters())
    if embedding is None or not (holds_copy or embedding.group is not None):
        return
    position = chunks[0].config
    shape = ((position.max_position_embeddings, position.hidden_size)
             if position.position_embedding == "learned_absolute" else None)
    main = embedding.main_weights(chunks, shape)
    if any(isinstance(p, DTensor) for c in chunks for p in c.parameters()):
        dp_cp_group = None  # FSDP2: data x context ranks hold different rows, not replicas
    for chunk in chunks:
        params = {n: held(p.detach()) for n, p in chunk.named_parameters()}
        if chunk.share_embeddings_and_output_weights and OUTPUT_LAYER_KEY in params:
            tie_output_layer_state_dict({OUTPUT_LAYER_KEY: params[OUTPUT_LAYER_KEY]},
                                        main[WORD_EMBEDDING_KEY], dp_cp_group=dp_cp_group)
        elif WORD_EMBEDDING_KEY in params and not chunk.stage.embedding:
            tie_word_embeddings_state_dict({WORD_EMBEDDING_KEY: params[WORD_EMBEDDING_KEY]},
                                           main[WORD_EMBEDDING_KEY], dp_cp_group=dp_cp_group)
            for key, value in main.items():
                if key != WORD_EMBEDDING_KEY and key in params:
                    tie_word_embeddings_state_dict({key: params[key]}, value, key, copy_key=key)


def sharded_model_state(chunks: Sequence[GPTModel], embedding: EmbeddingGroup | None,
                        dp_cp_group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    """This rank's stages under canonical names, sharded parameters as their local shards.

    Copies of the embedding (an MTP stage's, a tied output weight) are checked equal to the
    first stage's and left out: the first stage stores the logical weight once.
    """
    check_copies(chunks, embedding, dp_cp_group)
    state = {name: offer(chunk, name, param.detach())
             for chunk in chunks for name, param in chunk.named_parameters()
             if not is_copy(chunk, name)}
    for chunk in chunks:
        state.update({name: buffer.detach() for name, buffer in persistent_buffers(chunk)})
    return state


def persistent_buffers(chunk: GPTModel) -> list[tuple[str, torch.Tensor]]:
    """Buffers a state dict holds (MoE routers' expert biases and token counts), replicated."""
    return [(f"{path}.{name}" if path else name, buffer)
            for path, module in chunk.named_modules()
            for name, buffer in module._buffers.items()
            if buffer is not None and name not in module._non_persistent_buffers_set]


def _groups_by_param(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def sharded_optimizer_state(chunks: Sequence[GPTModel], optimizer: torch.optim.Optimizer
                            ) -> dict[str, Any]:
    """The optimizer state flattened per canonical parameter name, moments as local shards.

    Copies are left out as in the model state (their moments follow the main weight's: the
    copies' gradients are summed over the embedding group before every step).
    """
    groups = _groups_by_param(optimizer)
    flat: dict[str, Any] = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if id(param) not in groups or is_copy(chunk, name):  # frozen: no optimizer state
                continue
            for item, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() > 0:
                    value = offer(chunk, name, value)
                flat[f"state.{name}.{item}"] = value
            for hyper, value in groups[id(param)].items():
                if hyper != "params":
                    flat[f"param_groups.{name}.{hyper}"] = value
    return flat


def load_placeholders(chunks: Sequence[GPTModel], optimizer: torch.optim.Optimizer
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Local-shard-sized buffers for DCP to load into (AdamW's state: step and two moments);
    DCP reads whatever stored chunks overlap each rank's shards."""
    model: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            key = stored_key(chunk, name)
            local = held(param.detach())
            model[key] = offer(chunk, name, torch.empty_like(local), layout=param)
            optim[f"state.{key}.step"] = torch.tensor(NO_STATE)
            for moment in ("exp_avg", "exp_avg_sq"):
                optim[f"state.{key}.{moment}"] = offer(chunk, name, torch.zeros_like(local),
                                                      layout=param)
        model.update({name: torch.empty_like(b) for name, b in persistent_buffers(chunk)})
    return model, optim


@torch.no_grad()
def load_sharded_state(chunks: Sequence[GPTModel], optimizer: torch.optim.Optimizer,
                       model_sd: dict[str, Any], optim_sd: dict[str, Any]) -> None:
    """Copy the loaded local shards into the parameters and the optimizer state."""
    groups = _groups_by_param(optimizer)
    for chunk in chunks:
        for name, buffer in persistent_buffers(chunk):
            buffer.copy_(model_sd[name])
        for name, param in chunk.named_parameters():
            key = stored_key(chunk, name)
            held(param).copy_(take(model_sd[key]).to(param.dtype))
            step = optim_sd.get(f"state.{key}.step")
            if id(param) not in groups or step is None or float(step) == NO_STATE:
                continue
            optimizer.state[param] = {
                "step": step.detach().clone().float(),
                **{moment: like(param, take(optim_sd[f"state.{key}.{moment}"]).clone())
                   for moment in ("exp_avg", "exp_avg_sq")},
            }
