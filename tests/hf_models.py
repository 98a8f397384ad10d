"""Hugging Face model directories and mtp-cli models for the export/import tests (CPU, fp32,
random weights, no download).

The MTP depths of a transformers model live in `transformers.modeling_layers.MtpModel`, which
`save_pretrained` does not write: `write_mtp_layers` writes them in the DeepSeek-V3 layout the
released checkpoints use (`model.layers.{N+k}.` + enorm, hnorm, eh_proj, shared_head.norm, the
decoder layer's own tensors with experts one per expert, and the embed_tokens /
shared_head.head copies), the experts split by transformers' own save-time conversion.
`load_mtp_depths` reads them back through transformers' own load-time key conversion for MTP
weights (what `MtpModel.from_pretrained` does, for any number of depths).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtp_cli import build_model, load_spec
from mtp_cli.config.schema import RunSpec
from mtp_cli.inspect.checkpoint import open_checkpoint

VOCAB = 320  # >= 257: the byte tokenizer fits


def dense_sections(depths: int = 2, **model: Any) -> dict[str, Any]:
    """A tiny RMSNorm + SwiGLU + RoPE + GQA spec (Llama-shaped)."""
    base = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
            "num_query_groups": 2, "ffn_hidden_size": 48, "seq_length": 16,
            "normalization": "RMSNorm", "activation": "swiglu", "position_embedding": "rope",
            "add_bias_linear": False}
    return {"model": {**base, **model}, "mtp": {"num_layers": depths}}


@torch.no_grad()
def randomize_megatron(model: nn.Module, seed: int) -> None:
    """Every tensor of an mtp-cli model random: norms near 1, biases and expert biases
    non-zero, routers wide (clear top-k margins)."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith("expert_bias"):
            value = 0.05 * noise
        elif tensor.dim() == 1 and "norm" in name:
            value = 1.0 + 0.1 * noise
        elif name.endswith("router.weight"):
            value = 0.5 * noise
        else:
            value = 0.08 * noise
        tensor.copy_(value)


def random_model(sections: dict[str, Any], seed: int) -> tuple[RunSpec, nn.Module]:
    spec = load_spec(sections)
    model = build_model(spec).eval()
    randomize_megatron(model, seed)
    return spec, model


def read_safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in `directory`."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(path))
    return out


def mtp_file_tensors(main: nn.Module, mtp: nn.Module) -> dict[str, torch.Tensor]:
    """MtpModel `mtp`'s depths as a released DeepSeek-V3 / GLM-4.5 checkpoint stores them."""
    from transformers.core_model_loading import revert_weight_conversion

    first = main.config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for k, layer in enumerate(mtp.layers):
        prefix = f"model.layers.{first + k}."
        block = {prefix + n: t for n, t in layer.mtp_block.state_dict().items()}
        out.update(revert_weight_conversion(main, block))  # experts one per expert, as saved
        for name in ("enorm", "hnorm", "eh_proj"):
            out[f"{prefix}{name}.weight"] = getattr(layer, name).weight
        out[f"{prefix}shared_head.norm.weight"] = layer.post_norm.weight
        out[f"{prefix}embed_tokens.weight"] = main.get_input_embeddings().weight
        out[f"{prefix}shared_head.head.weight"] = main.lm_head.weight
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def write_mtp_layers(directory: Path, main: nn.Module, mtp: nn.Module,
                     file_name: str = "model-mtp.safetensors") -> None:
    """Add `mtp`'s depths to a `save_pretrained` directory: one more shard, the index and
    config.json's `num_nextn_predict_layers` updated."""
    from safetensors.torch import save_file

    tensors = mtp_file_tensors(main, mtp)
    save_file(tensors, str(directory / file_name), metadata={"format": "pt"})
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({name: file_name for name in tensors})
    index_path.write_text(json.dumps(index, indent=2))
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["num_nextn_predict_layers"] = len(mtp.layers)
    config_path.write_text(json.dumps(config, indent=2))


def load_mtp_depths(main: nn.Module, directory: Path, depths: int) -> nn.Module:
    """An `MtpModel(main, depths)` loaded from `directory`'s `model.layers.{N+k}` tensors
    through transformers' own key conversion for MTP weights; every weight must load."""
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_layers import MtpModel
    from transformers.modeling_utils import LoadStateDictConfig

    allow_mtp(main.config, depths)
    mtp = MtpModel(main, depths)
    first = main.config.num_hidden_layers
    prefixes = tuple(f"model.layers.{first + k}." for k in range(depths))
    state = {k: v for k, v in read_safetensors_dir(directory).items() if k.startswith(prefixes)}
    info, _ = convert_and_load_state_dict_in_model(
        model=mtp, state_dict=state,
        load_config=LoadStateDictConfig(weight_mapping=mtp.get_weight_conversions(main),
                                        dtype=torch.float32))
    mtp._adjust_missing_and_unexpected_keys(info)
    assert not info.missing_keys, sorted(info.missing_keys)
    assert not info.unexpected_keys, sorted(info.unexpected_keys)
    mtp.tie_with_main_model(main)
    return mtp.eval()


def allow_mtp(config: Any, depths: int) -> None:
    """Let transformers' generic MtpModel build `depths` layers for a Llama/Qwen2 config too
    (they have no MTP fields: full-attention layers, like their decoder layers)."""
    config.num_mtp_layers = depths
    if getattr(config, "layer_types", None) is not None:
        config.mtp_layer_types = ["full_attention"] * depths


def transformers_pair(config: Any, seed: int) -> tuple[nn.Module, nn.Module]:
    """A random transformers model and its MtpModel of `config.num_mtp_layers` depths."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import MtpModel

    from tests.hf_parity import randomize

    main = AutoModelForCausalLM.from_config(config).eval()
    depths = getattr(config, "num_mtp_layers", 0)
    allow_mtp(config, depths)
    mtp = MtpModel(main, depths).eval()
    randomize(main, torch.Generator().manual_seed(seed))
    for index, layer in enumerate(mtp.layers):
        randomize(layer, torch.Generator().manual_seed(seed * 100 + index))
    return main, mtp


def llama_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    args = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager")
    args.update(overrides)
    config = LlamaConfig(**args)
    config.num_mtp_layers = overrides.get("num_mtp_layers", 2)
    return config


def qwen2_config(**overrides: Any) -> Any:
    from transformers import Qwen2Config

    args = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rms_norm_eps=1e-5, tie_word_embeddings=True, attn_implementation="eager")
    args.update(overrides)
    config = Qwen2Config(**args)
    config.num_mtp_layers = overrides.get("num_mtp_layers", 2)
    return config


SEED = 4  # the seed of the random models import tests save


def saved_model(tmp_path: Path, config, *, shard: str = "40KB", dtype=None):
    """A random transformers model saved sharded, with its MTP depths written after it."""
    main, mtp = transformers_pair(config, SEED)
    if dtype is not None:
        main, mtp = main.to(dtype), mtp.to(dtype)
    directory = tmp_path / "hf"
    main.save_pretrained(directory, max_shard_size=shard)
    if len(mtp.layers):
        write_mtp_layers(directory, main, mtp)
    return directory, main, mtp


def imported_model(run_dir: Path):
    """The model of an import's step-0 checkpoint, loaded by name (every tensor present)."""
    checkpoint = open_checkpoint(run_dir)
    spec = load_spec(run_dir / "spec.yaml")
    model = build_model(spec).eval()
    model.load_state_dict(checkpoint.read(list(checkpoint.tensors)), strict=True)
    return spec, model
