"""Activation bytes one micro-batch leaves for the backward pass, by layer kind. Pure arithmetic.

Every figure is *bytes per token* of the rank's local sequence (`b x s / cp` tokens), counting the
tensors autograd saves in this package's local backend (checked against
`torch.autograd.graph.saved_tensors_hooks` in tests/test_memory_plan.py):

* a pre-norm transformer layer: the norm inputs (the fp32 residual stream; RMSNorm also keeps its
  normalised output), the linears' inputs in the compute dtype (`a` = 2 under bf16 autocast,
  4 in fp32), query/key/value as SDPA sees them (new tensors after RoPE or grouped-query
  repeats; the fused QKV output otherwise), SDPA's output and log-sum-exp (a fused kernel: no
  `s x s` probabilities, except with attention dropout), and the MLP's intermediates (GELU: fc1
  output and activation; SwiGLU: `[gate; up]`, silu(gate) and the product);
* tensor parallel divides everything inside attention and MLP by `tp`; sequence parallel also
  divides the norms' inputs (the gathered linear inputs stay whole);
* `recompute: full` keeps a layer's input only; `selective` drops SDPA's saved tensors.

The weights autocast casts to bf16 are saved with the activations too; they are counted
separately (`weight cache`, once per step) by `mtp_cli.plan.memory`.
"""

from __future__ import annotations

from dataclasses import dataclass

FP32 = 4


@dataclass(frozen=True)
class LayerShape:
    """What a layer's activations depend on (local to one tensor-parallel rank where noted)."""

    hidden: int
    heads: int
    query_groups: int
    head_dim: int
    value_dim: int
    ffn: int  # per token MLP width (routed: top-k x expert width + shared experts)
    gated: bool
    rms_norm: bool
    rope: bool
    rope_dim: int
    attention_dropout: bool
    hidden_dropout: bool
    seq_local: int  # s / cp: what attention's `s x s` grows with
    tp: int = 1
    sequence_parallel: bool = False


def norm_bytes(shape: LayerShape) -> int:
    """Per hidden channel of a norm: its fp32 input (autocast runs norms in fp32), and RMSNorm's
    normalised output besides."""
    return FP32 + (FP32 if shape.rms_norm else 0)


def transformer_layer_bytes(shape: LayerShape, act: int, recompute: str,
                            residual: int = FP32) -> float:
    """Bytes per token one transformer layer keeps for backward (`act`: compute dtype bytes,
    `residual`: the residual stream's dtype bytes)."""
    sp_div = shape.tp if shape.sequence_parallel else 1
    norm_keep = norm_bytes(shape)
    if recompute == "full":
        return residual * shape.hidden / sp_div
    tp, h = shape.tp, shape.hidden
    q = shape.heads * shape.head_dim
    k = shape.query_groups * shape.head_dim
    v = shape.query_groups * shape.value_dim
    # attention: norm input (+ RMS output), QKV input (gathered), q/k/v as SDPA keeps them
    attention = norm_keep * h / sp_div + act * h
    grouped = shape.query_groups != shape.heads
    if grouped:
        qkv = act * (q + q + shape.heads * shape.value_dim) / tp  # repeat_interleave'd k and v
    elif shape.rope:
        qkv = act * (q + k) / tp + act * (q + k + v) / tp  # rotated q, k + fused QKV (v is a view)
    else:
        qkv = act * (q + k + v) / tp
    rope = 4 * shape.rope_dim * act if shape.rope else 0  # cos / sin for q and k
    core = act * shape.heads * shape.value_dim / tp + FP32 * shape.heads / tp  # out + lse
    if shape.attention_dropout:  # the unfused path keeps the probabilities and the mask
        core += (act + 1) * shape.heads * shape.seq_local / tp
    if recompute == "selective":  # the core's inputs stay (views of QKV or RoPE's outputs)
        qkv = act * ((q + k) * shape.rope + q + k + v) / tp
        core = act * shape.heads * shape.value_dim / tp  # its output: linear_proj's input
    mlp = norm_keep * h / sp_div + act * h + act * shape.ffn * (4 if shape.gated else 2) / tp
    dropout = 2 * h / sp_div if shape.hidden_dropout else 0
    return attention + qkv + rope + core + mlp + dropout


def mtp_layer_bytes(shape: LayerShape, act: int, recompute: str) -> float:
    """One MTP depth: enorm(e) and hnorm(h) inputs, the `[e; h]` input of `eh_proj`, the
    transformer layer (its residual stream in the compute dtype: it starts at `eh_proj`'s
    output) and the final norm. `full` keeps the depth's two inputs (Megatron's checkpoint)."""
    h = shape.hidden
    sp_div = shape.tp if shape.sequence_parallel else 1
    if recompute == "full":
        return 2 * FP32 * h / sp_div
    concat = 2 * norm_bytes(shape) * h / sp_div + act * 2 * h
    final_norm = norm_bytes(shape) * h / sp_div
    return concat + transformer_layer_bytes(shape, act, recompute, residual=act) + final_norm


def head_saved_bytes(vocab_local: int, hidden: int, act: int, chunked: bool,
                     grads_in_forward: bool) -> float:
    """One output head (main or an MTP depth): per token, until its backward.

    Plain: the fp32 log-softmax `[tokens, V/tp]` and the head's input in the compute dtype.
    Chunked: the head's fp32 input (the function keeps what it was given) and a log-sum-exp;
    with gradients computed in the forward, an fp32 input gradient besides (the `[V, h]` weight
    gradient is per head, not per token: counted by the caller)."""
    if not chunked:
        return FP32 * vocab_local + act * hidden
    return FP32 * hidden + 2 * FP32 + (FP32 * hidden if grads_in_forward else 0)


def head_transient_bytes(vocab_local: int, hidden: int, act: int, *, chunked: bool,
                         chunk_tokens: int, tokens: int, bf16: bool,
                         grads_in_forward: bool) -> float:
    """Bytes (not per token) one head's pass adds on top of what is saved.

    Plain: its backward's fp32 gradients of the log-softmax and of the logits (and their bf16
    cast), or later the `[V, h]` weight gradient before it is accumulated. Chunked: one chunk's fp32 logits (and bf16 workspace), the bf16 copy of the `[V, h]`
    weight, and - where the gradients are made (backward by recomputation, or forward) - the fp32
    weight and input gradient accumulators and, under bf16, each chunk's `[V, h]` product before
    it is added in fp32."""
    low = act if bf16 else 0
    weight = vocab_local * hidden
    if not chunked:  # then the [V, h] weight gradient (bf16 product, fp32 cast) before it is
        # added to `.grad`, while the logits' gradient in the compute dtype is still held
        return max(tokens * vocab_local * (2 * FP32 + low),
                   tokens * vocab_local * act + weight * (low + FP32))
    chunk = min(chunk_tokens, tokens)
    workspace = chunk * vocab_local * (FP32 + low) + weight * low
    product = weight * (low + FP32) if bf16 else 0
    if grads_in_forward:  # the accumulators are saved (counted), backward only rescales them
        return max(workspace + product, weight * FP32 + tokens * hidden * FP32)
    return workspace + product + weight * FP32 + tokens * hidden * FP32
