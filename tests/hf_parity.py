"""Tiny transformers MoE models with random weights, and the same model built by mtp-cli."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtp_cli import build_model, load_spec
from mtp_cli.gpt import GPTModel
from mtp_cli.hf.configs import spec_sections
from mtp_cli.hf.mapping import ARCHITECTURES, hf_to_megatron
from mtp_cli.models.moe.router import TopKRouter

SEQ = 20  # longer than the DeepSeek config's original_max_position_embeddings (YaRN active)


def deepseek_config(**overrides: Any) -> Any:
    from transformers import DeepseekV3Config

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 12, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 0.7}
    args = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=4, n_group=4,
                topk_group=2, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24,
                qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=12,
                first_k_dense_replace=1, num_mtp_layers=2, max_position_embeddings=48,
                rope_parameters=rope, attn_implementation="eager")
    args.update(overrides)
    return DeepseekV3Config(**args)


def glm_config(**overrides: Any) -> Any:
    from transformers import Glm4MoeConfig

    args = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True,
                n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=4, n_group=4,
                topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
                num_mtp_layers=2, max_position_embeddings=64, attn_implementation="eager",
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.5})
    args.update(overrides)
    return Glm4MoeConfig(**args)


@torch.no_grad()
def randomize(module: nn.Module, generator: torch.Generator) -> None:
    """Every tensor random: norms near 1, routers wide (clear top-k margins), biases non-zero."""
    for name, tensor in module.state_dict().items():
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith("e_score_correction_bias"):
            value = 0.05 * noise
        elif tensor.dim() == 1 and "norm" in name:
            value = 1.0 + 0.1 * noise
        elif name.endswith("gate.weight"):
            value = 0.5 * noise
        else:
            value = 0.08 * noise
        tensor.copy_(value)


@dataclass
class ParityPair:
    hf_main: nn.Module
    hf_mtp: nn.Module
    ours: GPTModel


def build_pair(hf_config: Any, seed: int) -> ParityPair:
    """A transformers model and its MtpModel with random weights, and ours loaded from them."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import MtpModel

    main = AutoModelForCausalLM.from_config(hf_config).eval()
    mtp = MtpModel(main, hf_config.num_mtp_layers).eval()
    generator = torch.Generator().manual_seed(seed)
    randomize(main, generator)
    for index, layer in enumerate(mtp.layers):
        randomize(layer, torch.Generator().manual_seed(seed * 100 + index))
    state = dict(main.state_dict())
    state.update({f"mtp.{k}": v for k, v in mtp.state_dict().items()})
    sections, context = spec_sections(hf_config, seq_length=SEQ)
    ours = build_model(load_spec(sections)).eval()
    converted = hf_to_megatron(ARCHITECTURES[hf_config.model_type], state, context)
    result = ours.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ParityPair(main, mtp, ours)


class RoutingRecorder:
    """Expert sets each router chose, per call, from both implementations."""

    def __init__(self, pair: ParityPair) -> None:
        self.hf: list[torch.Tensor] = []
        self.hf_scores: list[torch.Tensor] = []
        self.ours: list[torch.Tensor] = []
        self.handles = []
        for module in [*pair.hf_main.modules(), *pair.hf_mtp.modules()]:
            if type(module).__name__.endswith("TopkRouter"):
                self.handles.append(module.register_forward_hook(self._hf_hook))
        for module in pair.ours.modules():
            if isinstance(module, TopKRouter):
                self.handles.append(module.register_forward_hook(self._our_hook))

    def _hf_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        logits, _, indices = output
        routing = torch.zeros_like(logits, dtype=torch.bool).scatter(1, indices, True)
        self.hf.append(routing)
        self.hf_scores.append(logits.sigmoid() + module.e_score_correction_bias)
        self.groups = (module.num_group, module.topk_group, module.top_k)

    def _our_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        seq_len, batch = inputs[0].shape[:2]  # our tokens are [s, b]; transformers' [b, s]
        self.ours.append(output[1].view(seq_len, batch, -1).transpose(0, 1).reshape(
            seq_len * batch, -1))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def selection_margin(scores: torch.Tensor, groups: int, group_topk: int, topk: int) -> float:
    """The smallest gap, over tokens, at each top-k decision: between the last chosen and the
    first rejected group (ranked by their top-2 sums), then between the last chosen and the
    first rejected expert of the chosen groups. Far from 0: no near-ties to break differently."""
    tokens, experts = scores.shape
    per_group = scores.view(tokens, groups, experts // groups)
    group_scores = per_group.topk(2, dim=-1).values.sum(dim=-1)
    ranked_groups = group_scores.sort(dim=-1, descending=True).values
    gaps = [ranked_groups[:, group_topk - 1] - ranked_groups[:, group_topk]] \
        if group_topk < groups else []
    chosen = group_scores.topk(group_topk, dim=-1).indices
    group_mask = torch.zeros(tokens, groups, dtype=torch.bool).scatter(1, chosen, True)
    expert_mask = group_mask.repeat_interleave(experts // groups, dim=1)
    ranked = scores.masked_fill(~expert_mask, float("-inf")).sort(dim=-1, descending=True).values
    gaps.append(ranked[:, topk - 1] - ranked[:, topk])
    return float(torch.stack([g.min() for g in gaps]).min())


def roll_left(ids: torch.Tensor) -> torch.Tensor:
    """mtp-cli's MTP roll: one token left, 0 rolled in at the end."""
    rolled = ids.roll(-1, dims=-1)
    rolled[..., -1] = 0
    return rolled


@torch.no_grad()
def hf_depth_logits(pair: ParityPair, ids: torch.Tensor) -> list[torch.Tensor]:
    """transformers' logits `[b, s, V]`: the main head, then each MtpModel depth (its
    `forward_layer` on the rolled ids, unshifted positions, and the shared head)."""
    hidden = pair.hf_main.model(ids).last_hidden_state
    logits = [pair.hf_main.lm_head(hidden)]
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    rolled = ids
    for depth in range(len(pair.hf_mtp.layers)):
        rolled = roll_left(rolled)
        hidden = pair.hf_mtp.forward_layer(depth, hidden, positions, None, input_ids=rolled)
        logits.append(pair.hf_mtp._project_to_logits(hidden))
    return logits


@torch.no_grad()
def our_depth_logits(model: GPTModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """mtp-cli's logits `[b, s, V]`: the main head, then every MTP depth's, from the block's
    `cat([h0, h1, ..., hD])`."""
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    rotary = model.rotary_pos_emb(positions)
    hidden = model.decoder(model.embedding(ids, positions), None, rotary, None)
    stacked = model.mtp(ids, positions, hidden, None, embedding=model.embedding,
                        rotary_pos_emb=rotary)
    weight = model.output_weight()
    return [(chunk @ weight.t()).transpose(0, 1)
            for chunk in stacked.chunk(1 + model.mtp.num_depths, dim=0)]
