"""One forward of a decoding stream over new positions, through its KV cache.

The main stream is the decoder (`GPTModel.decode_hidden`). MTP depth k's stream computes, at
row i, what training computes there (`mtp_cli.mtp.layer`): the embedding of token `i + k` at
position `i + k` (ids and positions rolled k times), `h_{k-1}[i]` (the previous depth's output
after its final norm), and the transformer layer with the *unshifted* rotary angles of row i.
The rolls are done here by indexing, and the layer runs through Megatron-Core's decomposition
(`_proj_and_transformer_layer`), with the depth's cache as its `inference_params`.
"""

from __future__ import annotations

import os

import torch

from mtp_cli.errors import Problem, UserError
from mtp_cli.generate.kv_cache import KVCache
from mtp_cli.gpt import GPTModel


def max_positions(model: GPTModel) -> int:
    return int(model.config.max_position_embeddings or model.config.seq_length)


def decode_bytes(model: GPTModel, prompt_lengths: list[int], new_tokens: int,
                 draft_depths: int) -> int:
    """An upper bound of what a decoding allocates up front: every stream's KV cache (keys and
    values of every head at the widest head size, each of `capacity` slots) and the token
    table, for `len(prompt_lengths)` rows."""
    config = model.config
    width = max(int(config.kv_channels or 0), int(getattr(config, "qk_head_dim", 0) or 0)
                + int(getattr(config, "qk_pos_emb_head_dim", 0) or 0),
                int(getattr(config, "v_head_dim", 0) or 0), 1)
    itemsize = model.output_weight().element_size()
    layers = int(config.num_layers) + (model.mtp.num_depths if model.mtp is not None else 0)
    capacity = max(prompt_lengths, default=0) + new_tokens + draft_depths + 2
    per_slot = 2 * int(config.num_attention_heads) * width * itemsize * layers + 8
    return len(prompt_lengths) * capacity * per_slot


def available_memory(device: torch.device) -> int:
    """Bytes free on `device` now (a GPU's free memory; the host's available memory)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf: no bound known
        return 2**62


def check_decode_memory(model: GPTModel, prompt_lengths: list[int], new_tokens: int,
                        draft_depths: int) -> None:
    """`UserError` naming --max-new-tokens when the caches would not fit in the memory free on
    the model's device: refused before anything is allocated (a model may declare 2^40
    positions; its caches are sized by the tokens asked for)."""
    device = model.output_weight().device
    needed = decode_bytes(model, prompt_lengths, new_tokens, draft_depths)
    free = available_memory(device)
    if needed > free:
        raise UserError(problems=[Problem(
            f"{new_tokens:,} new tokens for {len(prompt_lengths)} prompts need about "
            f"{needed / 1e9:.3g} GB of KV cache, more than the {free / 1e9:.3g} GB free on "
            f"{device.type}", key="--max-new-tokens", hint="ask for fewer tokens")])


def main_forward(model: GPTModel, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """`[b, s]` new tokens at rows `cache.lengths + 0..s-1` -> `h0 [s, b, h]` (the caller
    commits the cache)."""
    rows = cache.begin(tokens.shape[1])
    positions = rows.clamp(max=max_positions(model) - 1)  # filler rows only
    return model.decode_hidden(tokens, positions, cache)


def depth_forward(model: GPTModel, depth: int, cache: KVCache, hidden_in: torch.Tensor,
                  tokens: torch.Tensor) -> torch.Tensor:
    """MTP depth `depth` (1-based) at rows `cache.lengths + 0..s-1`: `hidden_in [s, b, h]` is
    `h_{depth-1}` at those rows, `tokens [b, s]` the ids at rows + depth. Returns `h_depth`."""
    rows = cache.begin(tokens.shape[1])
    limit = max_positions(model) - 1
    decoder_input = model.embedding(tokens, (rows + depth).clamp(max=limit))
    rotary = model.rotary_pos_emb(rows) if model.rotary_pos_emb is not None else None
    layer = model.mtp.layer_for_depth(depth - 1)
    return layer._proj_and_transformer_layer(
        hidden_states=hidden_in, decoder_input=decoder_input, attention_mask=None,
        rotary_pos_emb=rotary, inference_params=cache)


def gather_rows(buffer: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`buffer [b, cap, ...]` at `rows [b, s]` (clamped into the buffer) -> `[b, s, ...]`."""
    if rows.shape[0] == 1:  # one row: its positions are consecutive, a slice will do
        start = int(rows[0, 0])
        if start + rows.shape[1] <= buffer.shape[1]:
            return buffer[:, start:start + rows.shape[1]]
    rows = rows.clamp(max=buffer.shape[1] - 1)
    index = rows.view(*rows.shape, *([1] * (buffer.dim() - 2))).expand(
        *rows.shape, *buffer.shape[2:])
    return buffer.gather(1, index)


def scatter_rows(buffer: torch.Tensor, rows: torch.Tensor, values: torch.Tensor,
                 valid: torch.Tensor) -> None:
    """Write `values [b, s, ...]` into `buffer [b, cap, ...]` at `rows [b, s]` where `valid`."""
    if rows.shape[0] == 1:  # one row: a leading run of valid, consecutive positions
        start, count = int(rows[0, 0]), int(valid.sum())
        buffer[0, start:start + count] = values[0, :count]
        return
    b_index, s_index = valid.nonzero(as_tuple=True)
    buffer[b_index, rows[b_index, s_index]] = values[b_index, s_index]
