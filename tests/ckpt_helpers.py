"""Test helpers: DCP checkpoints in the run-directory layout of CONTRACTS.md, and tampering.

`write_dcp_checkpoint` saves a real model's state dict with `torch.distributed.checkpoint.save`
(no process group) the way `mtp train` lays it out: `RUN/checkpoints/step_NNNNNNN/` written as a
`.tmp-` directory, `meta.json` last, renamed, then `latest` replaced atomically.
`rewrite_dcp` loads a whole DCP checkpoint (trusted: our own test data), lets a test edit it and
saves the result as a new checkpoint directory with the same `meta.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from mtp_cli import build_model, load_spec
from mtp_cli.config.schema import RunSpec

TINY = {
    "model": {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
              "ffn_hidden_size": 64, "seq_length": 16},
    "mtp": {"num_layers": 2},
}


def tiny_spec(**sections: dict[str, Any]) -> RunSpec:
    """The tiny test spec with some sections' keys replaced."""
    data = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return load_spec(data)


def write_dcp_checkpoint(run_dir: Path, spec: RunSpec, *, step: int = 10,
                         tokens: int = 2560, model_state: dict[str, torch.Tensor] | None = None
                         ) -> Path:
    """A complete checkpoint of `spec`'s model (or of `model_state`) under run_dir."""
    if model_state is None:
        model_state = build_model(spec, "cpu").state_dict()
    state = {
        "model": model_state,
        "optimizer": {"state": {name: {"exp_avg": torch.zeros_like(t)}
                                for name, t in list(model_state.items())[:3]}},
        "scheduler": {"last_epoch": step},
        "trainer": {"step": step, "tokens": tokens},
        "rng.rank0": torch.get_rng_state(),
        "data.rank0": {"epoch": 0, "position": step},
    }
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    tmp = checkpoints / f"{name}.tmp-test"
    _save(state, tmp)
    depths = spec.mtp.num_layers
    meta = {
        "format": "mtp-cli-checkpoint/1", "step": step, "tokens": tokens,
        "spec": spec.model_dump(mode="json"),
        "losses": {"lm_loss": 3.25, **{f"mtp_{k}_loss": 3.5 + k / 10
                                       for k in range(1, depths + 1)}},
        "world_size": 1, "parallel": {"data": 1, "tensor": 1, "pipeline": 1, "context": 1},
        "mtp_cumulative": {"correct": [5] * depths, "total": [10] * depths},
        "created": "2026-11-28T12:00:00Z", "mtp_cli_version": "0.1.0",
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    os.replace(tmp, checkpoints / name)
    latest_tmp = checkpoints / "latest.tmp"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, checkpoints / "latest")
    return checkpoints / name


def _save(state: dict[str, Any], directory: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=directory, no_dist=True)


def load_whole_dcp(directory: Path) -> dict[str, Any]:
    """Every entry of a DCP checkpoint (unpickles its values: only for our own test data)."""
    state: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _load_state_dict(state, storage_reader=dcp.FileSystemReader(directory),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state


def rewrite_dcp(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Copy checkpoint `src` to `dst` with `edit` applied to its model state dict."""
    state = load_whole_dcp(src)
    edit(state["model"])
    _save(state, dst)
    shutil.copy(src / "meta.json", dst / "meta.json")
    return dst


def tiles(chunks: list[tuple[list[int], list[int]]], shape: list[int]) -> bool:
    """The boxes cover `shape` exactly once (every element counted)."""
    cover = torch.zeros(shape, dtype=torch.int32)
    for offsets, sizes in chunks:
        cover[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))] += 1
    return bool((cover == 1).all())


def assert_nothing_stored_whole(checkpoint: Path) -> int:
    """FSDP2 (with or without TP): every weight and Adam moment of more than one row is stored
    as chunks that tile it, none full-size. Returns how many tensors were checked."""
    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    checked = 0
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata) or len(entry.size) == 0 or \
                entry.size[0] < 2:
            continue
        if not (key.startswith("model.") or key.endswith((".exp_avg", ".exp_avg_sq"))):
            continue
        boxes = [(list(c.offsets), list(c.sizes)) for c in entry.chunks]
        assert len(boxes) >= 2 and all(s != list(entry.size) for _, s in boxes), (key, boxes)
        assert tiles(boxes, list(entry.size)), key
        checked += 1
    return checked
