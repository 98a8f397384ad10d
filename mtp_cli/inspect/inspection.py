"""`inspect_checkpoint`: everything `mtp inspect-ckpt` shows, as one `CheckpointInspection`.

Open the checkpoint, find its spec (stored in `meta.json`, or given with `--spec`), infer the
layout, group the tensors by part with parameter counts against the spec's model, and run the
structure and tie checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtp_cli.checkpoint import META_JSON
from mtp_cli.checkpoint.layout import meta_path
from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import UserError
from mtp_cli.inspect.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from mtp_cli.inspect.checks import Check, check_depths
from mtp_cli.inspect.expected import expected_shapes, spec_from_meta
from mtp_cli.inspect.finite import check_finite
from mtp_cli.inspect.layout import Layout, infer_layout
from mtp_cli.inspect.names import Naming, Part
from mtp_cli.inspect.select import select_names
from mtp_cli.inspect.shapes import check_shapes_against_spec, check_shapes_inferred
from mtp_cli.inspect.ties import check_mtp_ties, check_output_tie

PART_ORDER = {"embedding": 0, "decoder": 1, "mtp": 2, "output_layer": 3, "other": 4}


@dataclass
class PartRow:
    key: str  # embedding | decoder | mtp_{k} | output_layer | other
    label: str
    tensors: int = 0
    parameters: int = 0
    dtypes: set[str] = field(default_factory=set)
    expected_parameters: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"part": self.key, "label": self.label, "tensors": self.tensors,
                "parameters": self.parameters, "dtypes": sorted(self.dtypes),
                "expected_parameters": self.expected_parameters}


@dataclass
class CheckpointInspection:
    checkpoint: Checkpoint
    spec: RunSpec | None
    spec_source: str | None  # "meta.json" | "--spec" | None
    layout: Layout
    parts: list[PartRow]
    expected_parameters: int | None
    checks: list[Check]
    matched: list[TensorInfo] | None = None  # --tensors

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def stored_parameters(self) -> int:
        return sum(info.numel for info in self.checkpoint.tensors.values())

    def sections(self) -> list[dict[str, Any]]:
        """Non-model DCP entries (optimizer, rng, ...) by top-level key."""
        found: dict[str, dict[str, Any]] = {}
        for key, info in self.checkpoint.others.items():
            row = found.setdefault(key.split(".")[0], {"tensors": 0, "elements": 0, "values": 0})
            row["tensors"] += 1
            row["elements"] += info.numel
        for key in self.checkpoint.values:
            found.setdefault(key.split(".")[0], {"tensors": 0, "elements": 0, "values": 0})
            found[key.split(".")[0]]["values"] += 1
        return [{"section": name, **row} for name, row in found.items()]

    def as_dict(self) -> dict[str, Any]:
        ckpt, meta = self.checkpoint, self.checkpoint.meta
        out: dict[str, Any] = {
            "path": str(ckpt.path), "format": ckpt.kind, "step": ckpt.step,
            "tokens": meta.tokens if meta else None, "losses": meta.losses if meta else None,
            "spec_source": self.spec_source,
            "spec": self.spec.model_dump(mode="json") if self.spec else None,
            "layout": self.layout.as_dict(),
            "parameters": {"stored": self.stored_parameters, "expected": self.expected_parameters,
                           "tensors": len(ckpt.tensors)},
            "parts": [p.as_dict() for p in self.parts],
            "sections": self.sections(),
            "skipped": {"count": len(ckpt.skipped), "names": ckpt.skipped},
            "notes": ckpt.notes,
            "checks": [c.as_dict() for c in self.checks],
            "passed": self.passed,
        }
        for key in ("world_size", "parallel", "mtp_cumulative", "created", "mtp_cli_version"):
            if meta is not None and getattr(meta, key) is not None:
                out.setdefault("meta", {})[key] = getattr(meta, key)
        if self.matched is not None:
            out["tensors"] = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype,
                               "parameters": t.numel} for t in self.matched]
        return out


def _part_label(naming: Naming, key: str, index: int | None, layers: int) -> str:
    if key == "decoder":
        return f"decoder layers ({layers})"
    if key.startswith("mtp_"):
        return f"mtp depth {index + 1} ({naming.depth_prefix(index).rstrip('.')})"
    return key.replace("_", " ")


def group_parts(tensors: dict[str, TensorInfo], naming: Naming,
                expected: dict[str, tuple[int, ...]] | None) -> list[PartRow]:
    """Stored tensors by part; with a spec, each part's expected parameter count beside it."""
    rows: dict[str, PartRow] = {}
    order: dict[str, tuple[int, int]] = {}
    layers: set[int] = set()

    def row_for(part: Part) -> PartRow:
        order.setdefault(part.key, (PART_ORDER[part.kind], part.index or 0))
        return rows.setdefault(part.key, PartRow(part.key, part.key))

    for name, info in tensors.items():
        part = naming.part_of(name)
        if part.kind == "decoder" and part.index is not None:
            layers.add(part.index)
        row = row_for(part)
        row.tensors += 1
        row.parameters += info.numel
        row.dtypes.add(info.dtype)
    if expected is not None:
        for row in rows.values():
            row.expected_parameters = 0
        megatron = Naming("megatron")
        for name, shape in expected.items():
            row = row_for(megatron.part_of(name))
            row.expected_parameters = (row.expected_parameters or 0) + math.prod(shape)
    for key, row in rows.items():
        row.label = _part_label(naming, key, order[key][1], len(layers))
    return [rows[k] for k in sorted(rows, key=lambda k: order[k])]


def _spec_for(checkpoint: Checkpoint, spec: RunSpec | None) -> tuple[RunSpec | None, str | None]:
    if spec is not None:
        return spec, "--spec"
    if checkpoint.meta is not None:
        stored = spec_from_meta(checkpoint.meta, meta_path(checkpoint.path))
        if stored is not None:
            return stored, META_JSON
    return None, None


def _expected(checkpoint: Checkpoint, spec: RunSpec | None, layout: Layout
              ) -> dict[str, tuple[int, ...]] | None:
    """The spec's model names and shapes, when the spec can be built here for these names."""
    if spec is None:
        return None
    if layout.naming.style != "megatron":
        checkpoint.notes.append("Hugging Face names: shapes checked against the keys, not the "
                                "spec's model")
        return None
    try:
        return expected_shapes(spec)
    except UserError as error:  # e.g. a te-backend spec on a machine without Transformer Engine
        checkpoint.notes.append(f"the spec's model cannot be built here ({error}); shapes "
                                "checked against the keys")
        return None


def _spec_origin(source: str | None, spec_path: str | Path | None) -> str:
    """Where the spec came from, as the depth check and the layout line say it."""
    if source == "--spec":
        return f"--spec {spec_path}" if spec_path is not None else "the given spec"
    return f"the spec stored in {META_JSON}"


def inspect_checkpoint(path: str | Path, *, spec: RunSpec | None = None,
                       tensors: str | None = None, finite: bool = False,
                       spec_path: str | Path | None = None) -> CheckpointInspection:
    """Open PATH, run every check. `spec` overrides the stored one (read from `spec_path`, named
    in the report); `tensors` is a pattern; `finite` also reads every weight (one at a time)
    for the `finite` check."""
    checkpoint = open_checkpoint(Path(path))
    run_spec, source = _spec_for(checkpoint, spec)
    layout = infer_layout(checkpoint.tensors, run_spec, _spec_origin(source, spec_path))
    expected = _expected(checkpoint, run_spec, layout)
    checks = [check_depths(layout, checkpoint.tensors)]
    if expected is not None:
        handled = {n for n in checkpoint.tensors if layout.tied_output
                   and n == layout.naming.output_weight}
        stored = {n: i for n, i in checkpoint.tensors.items() if n not in handled}
        checks.append(check_shapes_against_spec(stored, expected, layout))
    else:
        checks.append(check_shapes_inferred(checkpoint.tensors, layout))
    checks.append(check_mtp_ties(checkpoint, layout))
    output_tie = check_output_tie(checkpoint, layout)
    if output_tie is not None:
        checks.append(output_tie)
    if finite:
        checks.append(check_finite(checkpoint))
    parts = group_parts(checkpoint.tensors, layout.naming, expected)
    expected_total = sum(math.prod(s) for s in expected.values()) if expected is not None else None
    matched = None
    if tensors is not None:
        every = {**checkpoint.tensors, **checkpoint.others}
        matched = [every[n] for n in select_names(tensors, every)]
    return CheckpointInspection(checkpoint, run_spec, source, layout, parts, expected_total, checks,
                         matched)


__all__ = ["CheckpointInspection", "PartRow", "inspect_checkpoint"]
