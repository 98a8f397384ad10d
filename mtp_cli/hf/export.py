"""`mtp export`: an mtp-cli checkpoint as a Hugging Face model directory.

CHECKPOINT is a run directory (the checkpoint a resume would use), a DCP checkpoint written at
any layout, or a `torch.save` state dict; it is read by tensor name through the inspect reader
(the allow-listed DCP metadata, no process group). The output:

```
DIR/config.json                       the transformers class that computes the same function
DIR/generation_config.json
DIR/model-0000k-of-0000n.safetensors  MTP depth k at model.layers.{N+k} (DeepSeek-V3 layout)
DIR/model.safetensors.index.json
DIR/tokenizer.json, tokenizer_config.json
DIR/mtp_cli_training.json             the spec's train and mtp sections (and model.seq_length),
                                      which `mtp import` of DIR restores
```

`target` (`--target vllm|sglang`) writes a dense model in MiMo's layout instead
(`mtp_cli.hf.serving`). Every file is mode 0644.

Streaming: the file tensors are grouped into output shards of at most `--shard-size` bytes
first (from the checkpoint's shapes alone), then each shard is one DCP read of the Megatron
tensors it needs (DCP re-reads `.metadata` on every call: reading tensor by tensor would cost
~10^5 reads for DeepSeek-V3), converted one tensor at a time while the source is released. Peak
memory is about the checkpoint bytes of one shard plus the largest tensor. The default dtype of
each tensor is the checkpoint's.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import Problem, UserError
from mtp_cli.hf.export_config import HFTarget, generation_config, hf_target, layout_context
from mtp_cli.hf.mapping import FileTensor, LayoutContext, to_hf_tensors
from mtp_cli.hf.memory import release_freed_memory
from mtp_cli.hf.output_dir import StagedDirectory, check_output
from mtp_cli.hf.serving import BESIDE, check_target, serving_plan
from mtp_cli.hf.tokenizer_files import read_run_tokenizer
from mtp_cli.hf.training_record import RECORD, training_record

INDEX = "model.safetensors.index.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_SIZE = 2**60  # bytes: an exabyte, past any device or file
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """`5GB` -> 5 * 10**9 bytes (KB/MB/GB decimal, KiB/MiB/GiB binary, plain bytes)."""
    stripped = text.strip().upper()
    number = stripped.rstrip("KMGTIB")
    unit = stripped[len(number):]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise UserError(problems=[Problem(f"{text!r} is not a size like 5GB, 500MB or 2GiB",
                                          key="--shard-size")]) from None
    if not math.isfinite(value) or value > MAX_SIZE:  # nan, inf, 1e400GB
        raise UserError(problems=[Problem(f"{text!r} is not a finite size of at most 2^60 "
                                          "bytes", key="--shard-size")])
    if value < 1:
        raise UserError(problems=[Problem("must be at least 1 byte", key="--shard-size")])
    return int(value)


@dataclass
class Shard:
    """The file tensors of one output file, and the bytes they take there."""

    tensors: list[FileTensor] = field(default_factory=list)
    nbytes: int = 0


@dataclass
class ExportResult:
    out: Path
    architecture: str
    shards: int
    tensors: int
    nbytes: int
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "architecture": self.architecture, "shards": self.shards,
                "tensors": self.tensors, "bytes": self.nbytes, "notes": self.notes}


def _expected_shapes(spec: RunSpec) -> dict[str, tuple[int, ...]]:
    from mtp_cli.builders.model_builder import build_model

    return {k: tuple(v.shape) for k, v in build_model(spec, "meta").state_dict().items()}


def _check_tensors(checkpoint: Any, expected: dict[str, tuple[int, ...]]) -> None:
    """The checkpoint holds every tensor of the spec's model with its shape."""
    stored = {name: info.shape for name, info in checkpoint.tensors.items()}
    missing = sorted(set(expected) - set(stored))
    changed = [f"{n} {list(stored[n])} (the spec: {list(s)})" for n, s in expected.items()
               if n in stored and stored[n] != s]
    problems = []
    if missing:
        problems.append(Problem(f"lacks {len(missing)} tensors of the spec's model: "
                                f"{', '.join(missing[:6])}", file=str(checkpoint.path)))
    if changed:
        problems.append(Problem(f"tensor shapes differ from the spec's model: "
                                f"{', '.join(changed[:6])}", file=str(checkpoint.path)))
    if problems:
        raise UserError(problems=problems)


def _hf_shapes(item: FileTensor, shape: tuple[int, ...], ctx: LayoutContext
               ) -> list[tuple[int, ...]]:
    meta = torch.empty(shape, device="meta")
    return [tuple(t.shape) for t in to_hf_tensors(item.layout, meta, ctx, len(item.hf))]


def plan_shards(items: list[FileTensor], shapes: dict[str, tuple[int, ...]],
                dtype_of: Callable[[str], torch.dtype], ctx: LayoutContext, limit: int
                ) -> list[Shard]:
    """File tensors in order, cut into shards of at most `limit` bytes (a Megatron tensor's HF
    tensors stay together; one larger than `limit` gets a shard of its own)."""
    shards = [Shard()]
    for item in items:
        itemsize = dtype_of(item.megatron).itemsize
        size = sum(_numel(s) * itemsize for s in _hf_shapes(item, shapes[item.megatron], ctx))
        if shards[-1].tensors and shards[-1].nbytes + size > limit:
            shards.append(Shard())
        shards[-1].tensors.append(item)
        shards[-1].nbytes += size
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _write_shard(shard: Shard, read: Callable[[list[str]], dict[str, torch.Tensor]],
                 ctx: LayoutContext, dtype_of: Callable[[str], torch.dtype], path: Path,
                 where: Path | str = "the checkpoint") -> list[str]:
    """One DCP read, conversion tensor by tensor (each source released after its last use),
    one safetensors file; returns the HF names written."""
    from safetensors.torch import save_file

    from mtp_cli.inspect.finite import refuse_nonfinite

    names = list(dict.fromkeys(item.megatron for item in shard.tensors))
    last_use = {item.megatron: i for i, item in enumerate(shard.tensors)}
    sources = read(names)
    refuse_nonfinite(sources, where)  # a NaN weight is never published
    out: dict[str, torch.Tensor] = {}
    written: set[int] = set()  # storages in `out`: safetensors refuses tensors sharing memory
    for i, item in enumerate(shard.tensors):
        source = sources[item.megatron]
        own = source.untyped_storage().data_ptr()
        parts = to_hf_tensors(item.layout, source, ctx, len(item.hf))
        for hf_name, part in zip(item.hf, parts, strict=True):
            tensor = part.to(dtype_of(item.megatron)) if part.is_floating_point() else part
            storage = tensor.untyped_storage().data_ptr()
            if storage in written or (item.layout != "copy" and storage == own):
                tensor = tensor.clone(memory_format=torch.contiguous_format)
            out[hf_name] = tensor.contiguous()
            written.add(out[hf_name].untyped_storage().data_ptr())
        del parts
        if last_use[item.megatron] == i:
            del sources[item.megatron], source
    try:
        save_file(out, str(path), metadata={"format": "pt"})
    except Exception as error:  # safetensors' own error type, "... I/O error: ... (os error 28)"
        code = re.search(r"\(os error (\d+)\)", str(error))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from error
    return list(out)


def export_checkpoint(path: Path, out: Path, *, spec_path: Path | None = None,
                      dtype: str | None = None, shard_size: str | int = "5GB",
                      overwrite: bool = False, echo: Callable[[str], None] | None = None,
                      target: str | None = None) -> ExportResult:
    """Write the Hugging Face model directory `out` of checkpoint `path` (see module doc) for
    the engine `target` (`mtp_cli.hf.serving`)."""
    from mtp_cli.data.tokenizer import load_tokenizer
    from mtp_cli.inspect.checkpoint import open_checkpoint
    from mtp_cli.inspect.expected import checkpoint_spec

    check_target(target)
    limit = parse_size(shard_size) if isinstance(shard_size, str) else int(shard_size)
    check_output(Path(out), overwrite=overwrite, sources=[Path(path)])
    checkpoint = open_checkpoint(Path(path))
    sources = [Path(path), Path(checkpoint.path)]
    spec = checkpoint_spec(checkpoint, spec_path)
    notes = list(checkpoint.notes)
    try:
        eod: int | None = load_tokenizer(spec.data.tokenizer, spec.model.vocab_size).eod
    except UserError as error:  # a model that never trained on its spec's data
        eod = None
        notes.append(f"no tokenizer written: {error}")
    expected = _expected_shapes(spec)
    _check_tensors(checkpoint, expected)
    stored_dtype = {n: getattr(torch, checkpoint.tensors[n].dtype) for n in expected}
    forced = DTYPES[dtype] if dtype is not None else None

    def dtype_of(name: str) -> torch.dtype:
        own = stored_dtype[name]
        return forced if forced is not None and own.is_floating_point else own

    by_bytes: dict[torch.dtype, int] = {}
    for name, shape in expected.items():
        by_bytes[dtype_of(name)] = by_bytes.get(dtype_of(name), 0) + _numel(shape)
    main_dtype = max(by_bytes, key=lambda d: by_bytes[d])
    hf = hf_target(spec, dtype=main_dtype, eos_token_id=eod, bos_token_id=eod)
    ctx = layout_context(spec)
    plan = serving_plan(spec, hf, ctx, list(expected), target)
    notes += plan.notes
    shards = plan_shards(plan.items, expected, dtype_of, ctx, limit)
    tokenizer = read_run_tokenizer(spec.data.tokenizer) if eod is not None else None
    weight_map: dict[str, str] = {}
    staged = StagedDirectory(Path(out), overwrite=overwrite, sources=sources, tool="mtp export")
    with staged as temp:
        for index, shard in enumerate(shards):
            name = shard_name(index, len(shards))
            for hf_name in _write_shard(shard, checkpoint.read, ctx, dtype_of, temp / name,
                                        checkpoint.path):
                weight_map[hf_name] = name
            release_freed_memory()
            if echo is not None:
                echo(f"wrote {name} ({shard.nbytes / 1e6:.1f} MB)")
        if plan.beside:
            (temp / BESIDE).mkdir()
            _write_shard(Shard(plan.beside), checkpoint.read, ctx, dtype_of,
                         temp / BESIDE / "model.safetensors", checkpoint.path)
        total = sum(s.nbytes for s in shards)
        _write_json(temp / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_metadata(temp, HFTarget(hf.model_type, plan.config), tokenizer)
        _write_json(temp / RECORD, training_record(spec))
        _readable_by_all(temp)
    notes += [f"removed {p}, left by an export or import that was killed" for p in staged.removed]
    return ExportResult(Path(out), plan.config["architectures"][0], len(shards),
                        len(weight_map), total, notes=notes)


def _write_metadata(directory: Path, target: HFTarget, tokenizer: dict[str, bytes] | None
                    ) -> None:
    """config.json, generation_config.json and (given them) the tokenizer files."""
    _write_json(directory / "config.json", target.config)
    _write_json(directory / "generation_config.json", generation_config(target))
    for name, data in (tokenizer or {}).items():
        (directory / name).write_bytes(data)


def _readable_by_all(directory: Path) -> None:
    """Every exported file 0644: safetensors' `save_file` creates 0600 files, which a serving
    engine running as another user (a container, a shared model cache) cannot read."""
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(0o644)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
