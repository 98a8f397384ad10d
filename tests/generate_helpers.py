"""Helpers for the decoding tests: tiny models (random or trained in-process), references."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from mtp_cli.builders.model_builder import build_model
from mtp_cli.config.loader import load_spec
from mtp_cli.generate.decode import decode_plain
from mtp_cli.generate.sampling import SamplingSettings
from mtp_cli.generate.sequences import Sequences
from mtp_cli.generate.speculative import SpeculativeDecoder
from mtp_cli.gpt import GPTModel
from tests.cli_helpers import SPECS

GREEDY = SamplingSettings()


def tiny_spec(*, depths: int = 2, vocab: int = 8, position: str = "rope", layers: int = 2,
              hidden: int = 32, seq_length: int = 64, spec_file: str = "tiny.yaml",
              extra: dict[str, Any] | None = None):
    data = yaml.safe_load((SPECS / spec_file).read_text())
    data["model"].update({"vocab_size": vocab, "num_layers": layers, "hidden_size": hidden,
                          "seq_length": seq_length, "position_embedding": position})
    if "moe_layer_freq" in data["model"]:
        data["model"]["moe_layer_freq"] = [0] + [1] * (layers - 1)
    if spec_file == "tiny.yaml":
        data["model"]["ffn_hidden_size"] = 2 * hidden
    data["model"].update(extra or {})
    data["mtp"]["num_layers"] = depths
    return load_spec(data)


def random_model(dtype: torch.dtype = torch.float64, seed: int = 0, std: float = 0.3,
                 **kwargs: Any) -> GPTModel:
    """Random weights, initialised wider than training would (`std`), so that greedy outputs
    vary and random drafts are sometimes accepted."""
    kwargs["extra"] = {"init_method_std": std, **(kwargs.get("extra") or {})}
    spec = tiny_spec(**kwargs)
    data = spec.model_dump(mode="json")
    data["train"]["seed"] = seed
    return build_model(load_spec(data)).to(dtype).eval()


def prompts_of(lengths: list[int], vocab: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def decode(model: GPTModel, prompts: list[torch.Tensor], new: int, draft_depths: int = 0, *,
           settings: SamplingSettings = GREEDY, seed: int = 0, eod: int | None = None,
           record: bool = False, expanded_mla: bool = False) -> tuple[list[list[int]], Any]:
    """(generated ids per prompt, the speculative decoder or None); `expanded_mla`: the
    reference KV cache of per-head MLA keys and values."""
    limit = int(model.config.max_position_embeddings)
    seqs = Sequences(prompts, new, limit, eod, torch.device("cpu"), scratch=draft_depths + 1)
    generator = torch.Generator().manual_seed(seed)
    if not draft_depths:
        decode_plain(model, seqs, settings, generator, expanded_mla=expanded_mla)
        return seqs.generated(), None
    decoder = SpeculativeDecoder(model, seqs, settings, draft_depths, generator, record=record,
                                 expanded_mla=expanded_mla)
    decoder.run()
    return seqs.generated(), decoder


def train_in_process(model: GPTModel, vocab: int, steps: int, seq_length: int = 32,
                     batch: int = 8, lr: float = 3e-3, seed: int = 0) -> GPTModel:
    """A few AdamW steps of the LM + MTP objective on the embedded corpus (bytes folded into
    the vocabulary), so the MTP heads learn something real."""
    from mtp_cli.data.corpus import stdlib_files

    text = b"".join(p.read_bytes() for p in stdlib_files()[:20])[:400_000]
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long() % vocab
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq_length - 1, (batch,), generator=g)
        windows = torch.stack([data[s:s + seq_length + 1] for s in starts.tolist()])
        loss = model(windows[:, :-1], labels=windows[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def save_run_dir(model: GPTModel, spec, run_dir: Path) -> Path:
    """`run_dir` with a step-0 DCP checkpoint of `model` (what `mtp train` would resume)."""
    from mtp_cli.hf.step0_checkpoint import write_step0_checkpoint

    state = {n: t.detach().float().clone() for n, t in model.state_dict().items()}
    write_step0_checkpoint(run_dir, spec, {n: (tuple(t.shape), t.dtype, (lambda t=t: t))
                                           for n, t in state.items()}, {})
    return run_dir
