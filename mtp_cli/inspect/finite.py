"""The `finite` check of `inspect-ckpt --strict`: no NaN or inf in any stored weight or loss.

Weights are read one tensor at a time (a DCP checkpoint loads just that tensor's bytes), so
memory stays at the largest tensor whatever the checkpoint's size. Losses come from
`meta.json`, where `mtp train` writes a non-finite value as null with `"nonfinite": true`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from mtp_cli.checkpoint import CheckpointMeta
from mtp_cli.errors import Problem, UserError
from mtp_cli.inspect.checkpoint import Checkpoint
from mtp_cli.inspect.checks import Check, name_list


def _floating(dtype: str) -> bool:
    value = getattr(torch, dtype, None)
    return isinstance(value, torch.dtype) and value.is_floating_point


def _bad_losses(meta: CheckpointMeta | None) -> list[str]:
    losses = meta.losses if meta is not None else None
    if losses is None:
        return []
    return sorted(k for k, v in losses.items()
                  if v is None or (isinstance(v, float) and not math.isfinite(v)))


def check_finite(checkpoint: Checkpoint) -> Check:
    """Every floating-point model tensor and every loss in meta.json is finite."""
    bad: list[str] = []
    details: list[dict[str, Any]] = []
    for name, info in checkpoint.tensors.items():
        if not _floating(info.dtype):
            continue
        tensor = checkpoint.read([name])[name]
        nonfinite = int((~torch.isfinite(tensor)).sum())
        del tensor
        if nonfinite:
            bad.append(name)
            details.append({"tensor": name, "nonfinite_elements": nonfinite})
    losses = _bad_losses(checkpoint.meta)
    if not bad and not losses:
        return Check("finite", True, f"every weight ({len(checkpoint.tensors)} tensors, read one "
                                     "at a time) and every stored loss is finite")
    problems = []
    if bad:
        problems.append(f"non-finite values in {name_list(bad)}")
    if losses:
        problems.append(f"non-finite losses in meta.json: {', '.join(losses)}")
    return Check("finite", False, "; ".join(problems), tensors=bad, details=details)


def refuse_nonfinite(tensors: dict[str, torch.Tensor], where: Path | str) -> None:
    """`UserError` naming the tensors of `tensors` holding NaN or inf (file `where`): export,
    generate, eval and import refuse such weights rather than pass them on silently
    (`mtp inspect-ckpt --strict` lists every one)."""
    bad = [name for name, tensor in tensors.items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise UserError(problems=[Problem(
            f"non-finite weights (NaN or inf) in {name_list(bad)}; refusing to use them",
            file=str(where), hint="mtp inspect-ckpt --strict lists every one")])
