"""Model FLOPs of a training step, counted as Megatron-LM counts them.

`num_floating_point_operations` follows Megatron-LM's function of that name
(`megatron/training/training.py`): every GEMM three times (forward, weight gradient, data
gradient), two FLOPs per multiply-add, core attention halved for the causal mask, and the MTP
term: each depth adds its transformer layer (MoE when the decoder's last layer is), its enorm,
hnorm and final norm (3h), its `eh_proj` (2h x h) and its output-head logits. Norms, softmax
and the optimizer are left out, as there. It is the *model* FLOP count (recomputation does not
add to it), which is what MFU divides by the device's peak.

Packed documents pass `seqlen_squared_sum` (sum of each document's length squared) as Megatron
does for THD batches: attention within documents only.
"""

from __future__ import annotations

from mtp_cli.config.moe_fields import is_moe_layer
from mtp_cli.config.schema import ModelConfig, RunSpec

FORWARD_BACKWARD = 3  # forward, backward data gradient, backward weight gradient
FMA = 2  # a multiply-add is two floating-point operations


def _mlp_widths(model: ModelConfig, mtp_layers: int) -> float:
    """Sum over decoder and MTP layers of each layer's MLP GEMM width (ffn x 2 or 3)."""
    expansion = 3 if model.activation == "swiglu" else 2
    if model.num_moe_experts is None:
        return (model.num_layers + mtp_layers) * model.ffn_hidden_size * expansion
    pattern = [is_moe_layer(model.moe_layer_freq, i) for i in range(model.num_layers)]
    moe_layers = sum(pattern) + (mtp_layers if pattern[-1] else 0)
    dense_layers = model.num_layers + mtp_layers - moe_layers
    routed = (model.moe_ffn_hidden_size or model.ffn_hidden_size) * model.moe_router_topk
    shared = model.moe_shared_expert_intermediate_size or 0
    return expansion * (dense_layers * model.ffn_hidden_size + moe_layers * (routed + shared))


def _attention_terms(model: ModelConfig) -> tuple[float, float]:
    """(token-linear FLOPs per token, core FLOPs per squared sequence length) of one layer."""
    h, heads = model.hidden_size, model.num_attention_heads
    if model.multi_latent_attention:
        qk = model.qk_head_dim + model.qk_pos_emb_head_dim
        if model.q_lora_rank is None:
            q_term = h * heads * qk
        else:
            q_term = model.q_lora_rank * (h + heads * qk + 1)
        kv_term = (model.kv_lora_rank * (h + heads * (model.qk_head_dim + model.v_head_dim) + 1)
                   + h * model.qk_pos_emb_head_dim)
        linear = q_term + kv_term + heads * model.v_head_dim * h
        core = heads * qk / 2 + heads * model.v_head_dim / 2
    else:
        query = model.kv_channels * heads
        key_value = model.kv_channels * model.num_query_groups
        linear = h * (query + 2 * key_value) + query * h
        core = query / 2 * 2  # causal: half the scores; QK^T and softmax(QK^T) V
    return FORWARD_BACKWARD * FMA * linear, FORWARD_BACKWARD * FMA * core


def num_floating_point_operations(spec: RunSpec, batch_size: int,
                                  seqlen_squared_sum: float | None = None,
                                  total_tokens: float | None = None) -> float:
    """Model FLOPs of one global batch of `batch_size` sequences (forward and backward).

    `total_tokens` defaults to `batch_size x seq_length` and `seqlen_squared_sum` to
    `batch_size x seq_length^2` (unpacked sequences); packed batches pass both.
    """
    model, mtp_layers = spec.model, spec.mtp.num_layers
    if total_tokens is None:
        total_tokens = batch_size * model.seq_length
    if seqlen_squared_sum is None:
        seqlen_squared_sum = batch_size * model.seq_length ** 2
    h = model.hidden_size
    attention_linear, attention_core = _attention_terms(model)
    layers = model.num_layers + mtp_layers
    per_token = (
        FORWARD_BACKWARD * FMA * h * _mlp_widths(model, mtp_layers)
        + attention_linear * layers
        + FORWARD_BACKWARD * FMA * mtp_layers * (3 * h + 2 * h * h)
        + FORWARD_BACKWARD * FMA * h * model.vocab_size * (mtp_layers + 1)
    )
    return total_tokens * per_token + seqlen_squared_sum * attention_core * layers


def flops_per_token(spec: RunSpec) -> float:
    """Model FLOPs per trained token at the spec's sequence length (forward and backward)."""
    return num_floating_point_operations(spec, 1) / spec.model.seq_length
