"""MLA's compressed decoding cache against the expanded per-head one it replaced.

1. Cache bytes per token and layer at DeepSeek-V3's attention dimensions, read from
   specs/deepseek_v3.yaml: one MLA layer with exactly those dimensions (128 heads, q_lora 1536,
   kv_lora 512, qk 128 + rope 64, v 128; hidden, vocabulary and FFN shrunk, which the cache does
   not depend on) decodes a few tokens in bfloat16 through each cache, and the bytes the cache
   holds are read back from its tensors; the expected counts are `kv_lora_rank + rope` = 576
   values against `heads x (qk + rope + v)` = 40,960.
2. Decoding tokens/s of a tiny MLA model (random weights, float32, one thread), greedy, one
   position per forward after the prompt's prefill (the decoding steps are timed, the prefill,
   the same path in both, is not), through each cache: the same prompt, the same tokens
   (checked); a short and a long context; runs interleaved A B A B, REPEATS pairs, and the
   median of the per-pair ratios. Times are CPU seconds of this process (`time.process_time`):
   the machine is shared.

Run: `python benchmarks/mla_cache.py [--repeats N]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtp_cli.builders.model_builder import build_model  # noqa: E402
from mtp_cli.config.loader import load_spec  # noqa: E402
from mtp_cli.generate.kv_cache import KVCache  # noqa: E402
from mtp_cli.generate.streams import main_forward  # noqa: E402

CLOCK = time.process_time
ATTENTION_KEYS = ("num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
                  "qk_pos_emb_head_dim", "v_head_dim", "qk_layernorm", "rope_type",
                  "rotary_scaling_factor", "original_max_position_embeddings", "mscale",
                  "mscale_all_dim", "multi_latent_attention", "normalization")
# the tiny decoding model: specs/tiny.yaml with MLA (8 heads: 8 x (32 + 16 + 32) = 640 values per
# token and layer expanded, 64 + 16 = 80 compressed)
TINY_MLA = {"num_layers": 4, "hidden_size": 256, "num_attention_heads": 8,
            "num_query_groups": None, "ffn_hidden_size": 512, "seq_length": 1024,
            "vocab_size": 320, "multi_latent_attention": True, "q_lora_rank": 96,
            "kv_lora_rank": 64, "qk_head_dim": 32, "qk_pos_emb_head_dim": 16, "v_head_dim": 32,
            "qk_layernorm": True}


def deepseek_one_layer() -> tuple[Any, dict[str, Any]]:
    """One decoder layer with DeepSeek-V3's attention, bfloat16; and the spec's dimensions."""
    source = yaml.safe_load((ROOT / "specs/deepseek_v3.yaml").read_text())["model"]
    model = {key: source[key] for key in ATTENTION_KEYS if key in source}
    model.update({"vocab_size": 64, "hidden_size": 256, "num_layers": 1, "ffn_hidden_size": 256,
                  "seq_length": 64, "activation": "swiglu", "position_embedding": "rope",
                  "add_bias_linear": False})
    spec = load_spec({"model": model, "mtp": {"num_layers": 0}})
    torch.manual_seed(0)
    return build_model(spec).to(torch.bfloat16).eval(), source


@torch.no_grad()
def cache_bytes() -> dict[str, Any]:
    model, source = deepseek_one_layer()
    ids = torch.randint(0, 64, (1, 6))
    held = {}
    for name, expanded in (("compressed", False), ("expanded", True)):
        cache = KVCache(1, 8, expanded_mla=expanded)
        main_forward(model, cache, ids[:, :4])
        cache.commit(torch.tensor([4]))
        main_forward(model, cache, ids[:, 4:5])  # a decoding step through the cache
        held[name] = cache.bytes_per_token()
    heads, rope = source["num_attention_heads"], source["qk_pos_emb_head_dim"]
    expected = {"compressed": source["kv_lora_rank"] + rope,
                "expanded": heads * (source["qk_head_dim"] + rope + source["v_head_dim"])}
    values = {name: held[name] // 2 for name in held}  # bfloat16
    assert values == expected, (values, expected)
    return {"values_per_token_layer": values, "bf16_bytes_per_token_layer": held,
            "ratio": held["expanded"] / held["compressed"],
            "bf16_MiB_per_token_all_layers": {
                name: held[name] * source["num_layers"] / 2**20 for name in held}}


def tiny_model() -> Any:
    data = yaml.safe_load((ROOT / "specs/tiny.yaml").read_text())
    data["model"].update(TINY_MLA)
    data["mtp"]["num_layers"] = 0
    torch.manual_seed(0)
    return build_model(load_spec(data)).eval()


@torch.no_grad()
def decode_once(model: Any, prompt: torch.Tensor, new: int, expanded: bool
                ) -> tuple[list[int], float]:
    """Greedy decoding of `new` tokens after `prompt`, as `decode_plain` does it (prefill, then
    one position per forward); returns the tokens and the CPU seconds of the one-position steps
    (the prefill, the same up-projected path in both caches, is not timed)."""
    cache = KVCache(1, prompt.numel() + new + 1, expanded_mla=expanded)
    hidden = main_forward(model, cache, prompt[None])
    cache.commit(torch.tensor([prompt.numel()]))
    token = model.logits(hidden[-1:])[0, 0].argmax()
    out = [int(token)]
    start = CLOCK()
    for _ in range(new - 1):
        hidden = main_forward(model, cache, token.view(1, 1))
        cache.advance(torch.ones(1, dtype=torch.long))
        token = model.logits(hidden)[0, 0].argmax()
        out.append(int(token))
    return out, CLOCK() - start


def tokens_per_second(model: Any, prompt_len: int, new: int, repeats: int) -> dict[str, Any]:
    prompt = torch.randint(0, 320, (prompt_len,), generator=torch.Generator().manual_seed(1))
    rates: dict[str, list[float]] = {"expanded": [], "compressed": []}
    outputs = {}
    for _ in range(repeats):
        for name in ("expanded", "compressed"):  # A B A B
            out, seconds = decode_once(model, prompt, new, name == "expanded")
            rates[name].append((len(out) - 1) / seconds)
            outputs[name] = out
    assert outputs["expanded"] == outputs["compressed"], "the two caches decoded differently"
    ratios = [c / e for c, e in zip(rates["compressed"], rates["expanded"], strict=True)]
    return {"prompt": prompt_len, "new_tokens": new,
            "tok_s_expanded_median": statistics.median(rates["expanded"]),
            "tok_s_compressed_median": statistics.median(rates["compressed"]),
            "compressed_over_expanded_median_ratio": statistics.median(ratios),
            "ratios": [round(r, 3) for r in ratios], "identical_tokens": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps({"deepseek_v3_cache": cache_bytes()}, indent=1), flush=True)
    model = tiny_model()
    for prompt_len, new in ((16, 128), (768, 64)):
        row = tokens_per_second(model, prompt_len, new, args.repeats)
        print(json.dumps({"tiny_mla_decoding": row}), flush=True)


if __name__ == "__main__":
    main()
