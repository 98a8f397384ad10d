"""Structure checks: each a pass/fail with a reason that names what is wrong.

`mtp_depths`: every MTP depth `mtp.layers.0..D-1` is present, with no gaps and no extras (one
layer with `mtp.use_repeated_layer`); without a spec, D is read from the keys and every depth must
hold the same tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mtp_cli.inspect.checkpoint import TensorInfo
from mtp_cli.inspect.layout import Layout

MAX_NAMED = 6  # tensors named in a reason; the JSON lists them all


@dataclass
class Check:
    name: str
    passed: bool
    reason: str
    note: str | None = None
    tensors: list[str] = field(default_factory=list)  # tensors at fault (or noted)
    details: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "passed": self.passed, "reason": self.reason,
                               "note": self.note, "tensors": self.tensors}
        if self.details:
            out["details"] = self.details
        return out


def name_list(names: list[str], limit: int = MAX_NAMED) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _depth_names(layout: Layout, indices: list[int]) -> list[str]:
    return [layout.naming.depth_prefix(i).rstrip(".") for i in indices]


def check_depths(layout: Layout, tensors: Mapping[str, TensorInfo]) -> Check:
    """Every MTP depth present, no gaps, no extras; depths hold the same tensors (no spec)."""
    present = layout.present_depths
    if layout.repeated_layer:
        expected = [0] if layout.depths else []
    else:
        expected = list(range(layout.depths))
    missing = [d for d in expected if d not in present]
    extra = [d for d in present if d not in expected]
    source = layout.depth_origin
    problems = []
    if missing:
        problems.append(f"missing {name_list(_depth_names(layout, missing))}")
    if extra:
        problems.append(f"unexpected {name_list(_depth_names(layout, extra))}")
    if problems:
        kind = " (mtp.use_repeated_layer: one layer)" if layout.repeated_layer else ""
        return Check("mtp_depths", False,
                     f"{'; '.join(problems)}: D={layout.depths} from {source}{kind}, present: "
                     f"{', '.join(_depth_names(layout, present)) or 'none'}",
                     tensors=_depth_names(layout, missing + extra))
    incomplete = _incomplete_depths(layout, tensors) if layout.depth_source == "keys" else []
    if incomplete:
        return Check("mtp_depths", False,
                     f"depths differ: {name_list(incomplete)} missing (held by other depths)",
                     tensors=incomplete)
    if not layout.depths:
        return Check("mtp_depths", True, f"no MTP depths (D=0 from {source})")
    names = _depth_names(layout, expected)
    if layout.repeated_layer:
        reason = f"{names[0]} present, applied at all {layout.depths} depths (repeated layer)"
    else:
        last = names[-1].rsplit(".", 1)[-1]
        reason = f"{names[0]}..{last} present" if len(names) > 1 else f"{names[0]} present"
        reason += f", D={layout.depths} from {source}"
    note = None
    if layout.depth_source == "keys" and layout.depths == 1:
        note = "one MTP layer: D=1, or a repeated layer applied at several depths"
    return Check("mtp_depths", True, reason, note=note)


def _incomplete_depths(layout: Layout, tensors: Mapping[str, TensorInfo]) -> list[str]:
    """Tensors some depth lacks that another depth holds (tie copies aside)."""
    naming = layout.naming
    copies = naming.copy_tails()
    held: dict[int, set[str]] = {d: set() for d in layout.present_depths}
    for name in tensors:
        part = naming.part_of(name)
        if part.kind == "mtp" and part.rest not in copies:
            held[part.index].add(part.rest)
    union = set().union(*held.values()) if held else set()
    missing = []
    for depth, rests in held.items():
        missing += [_depth_tensor(layout, depth, rest) for rest in sorted(union - rests)]
    return missing


def _depth_tensor(layout: Layout, depth: int, rest: str) -> str:
    name = layout.naming.depth_prefix(depth) + rest
    if layout.transformer_layer_name == "mtp_model_layer":
        name = name.replace(".transformer_layer.", ".mtp_model_layer.")
    return name
