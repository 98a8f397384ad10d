"""Which file tensors make which Megatron tensor of an import, checked before anything is read.

From the spec's model (built on the meta device) and the weight files' headers: every Megatron
tensor comes from its Hugging Face tensors (`mtp_cli.hf.mapping.file_tensors`) with the shapes
the layout predicts, or - an MTP depth the checkpoint does not have - is initialised fresh by
name. A depth config.json declares that no weight file holds a tensor of (what `save_pretrained`
writes for a model with MTP layers, and what fine-tuning tools leave) is initialised fresh too,
and said so in one line. Each problem names the file at fault: a tensor config.json implies but
no file holds, a shape the config does not give, a tensor nothing in config.json accounts for.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch

from mtp_cli.errors import Problem, UserError
from mtp_cli.hf.hf_files import HFDirectory
from mtp_cli.hf.mapping import Architecture, FileTensor, LayoutContext, file_tensors, to_hf_tensors
from mtp_cli.hf.serving import is_mimo, mimo_depth_items

IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # old checkpoints stored RoPE tables
LAYER = re.compile(r"model\.layers\.(\d+)\.")
MIMO_LAYER = re.compile(r"model\.mtp_layers\.(\d+)\.")
SHOWN = 6


@dataclass
class ImportPlan:
    """What the import reads, initialises fresh, and checks."""

    imported: list[FileTensor] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)  # Megatron names of new MTP depths
    copies: list[tuple[str, str]] = field(default_factory=list)  # (HF copy, HF main) to compare
    skipped: list[str] = field(default_factory=list)  # HF tensors of depths beyond mtp.num_layers
    notes: list[str] = field(default_factory=list)


def _names(items: list[str]) -> str:
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def _depth_of(name: str) -> int | None:
    match = re.match(r"mtp\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def expected_hf_shapes(item: FileTensor, shape: tuple[int, ...], ctx: LayoutContext
                       ) -> list[tuple[int, ...]]:
    meta = torch.empty(shape, device="meta")
    return [tuple(t.shape) for t in to_hf_tensors(item.layout, meta, ctx, len(item.hf))]


def absent_depths(hf: HFDirectory, ctx: LayoutContext) -> list[int]:
    """The MTP depths config.json declares (0-based) that no weight file holds a tensor of."""
    if is_mimo(hf.config):
        held = {int(m.group(1)) for name in hf.tensors if (m := MIMO_LAYER.match(name))}
        return [k for k in range(ctx.mtp_layers) if k not in held]
    held = {int(m.group(1)) for name in hf.tensors if (m := LAYER.match(name))}
    return [k for k in range(ctx.mtp_layers) if ctx.num_layers + k not in held]


def depth_prefix(hf: HFDirectory, ctx: LayoutContext, k: int) -> str:
    """Where depth k's tensors are in the files: MiMo's `model.mtp_layers.{k}.` or DeepSeek-V3's
    `model.layers.{N+k}.`."""
    if is_mimo(hf.config):
        return f"model.mtp_layers.{k}."
    return f"model.layers.{ctx.num_layers + k}."


def planned_file_tensors(arch: Architecture, ctx: LayoutContext, hf: HFDirectory,
                         shapes: dict[str, tuple[int, ...]], *, tied: bool, depths: int
                         ) -> list[FileTensor]:
    """The file tensors of the spec's model with `depths` MTP depths, in the directory's
    layout (MiMo's, as `mtp export --target vllm` writes it, or the DeepSeek-V3 one)."""
    if not is_mimo(hf.config):
        return file_tensors(arch, dataclasses.replace(ctx, mtp_layers=depths), shapes, tied=tied)
    main = [name for name in shapes if not name.startswith("mtp.")]
    return (file_tensors(arch, dataclasses.replace(ctx, mtp_layers=0), main, tied=tied)
            + mimo_depth_items(list(shapes), depths))


def plan_import(arch: Architecture, ctx: LayoutContext, hf: HFDirectory,
                shapes: dict[str, tuple[int, ...]], *, tied: bool, depths: int,
                mtp_from: str | None = None) -> ImportPlan:
    """Match the spec's Megatron tensors (`shapes`) to the files; `depths` MTP depths wanted,
    `ctx.mtp_layers` declared by config.json. `mtp_from`: the depths come from that directory
    (`mtp_cli.hf.mtp_graft`), so none is planned here and the checkpoint's own are skipped."""
    own = 0 if mtp_from else depths
    if mtp_from:
        shapes = {name: shape for name, shape in shapes.items() if not name.startswith("mtp.")}
    absent = absent_depths(hf, ctx)
    plan, missing = ImportPlan(), []
    main_of = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
               "output_layer.weight": "lm_head.weight"}
    for item in planned_file_tensors(arch, ctx, hf, shapes, tied=tied, depths=own):
        present = [name in hf.tensors for name in item.hf]
        depth = _depth_of(item.megatron)
        if item.copy:
            if all(present):
                plan.copies.append((item.hf[0], main_of[item.megatron]))
        elif all(present):
            plan.imported.append(item)
        elif depth is not None and (depth >= ctx.mtp_layers or depth in absent):
            plan.fresh.append(item.megatron)
        else:
            missing += [name for name, found in zip(item.hf, present, strict=True) if not found]
    if tied and "lm_head.weight" in hf.tensors:
        plan.copies.append(("lm_head.weight", "model.embed_tokens.weight"))
    if missing:
        raise UserError(problems=[Problem(
            f"config.json describes tensors no weight file holds: {_names(missing)}",
            file=str(hf.config_path), hint="is config.json the one these weights were saved with?")])
    _check_shapes(plan, hf, shapes, ctx)
    _account_for_every_tensor(plan, hf, ctx, own, mtp_from)
    if plan.fresh:
        plan.notes.append(fresh_note(sorted({_depth_of(n) or 0 for n in plan.fresh}), ctx,
                                     absent))
    return plan


def fresh_note(new: list[int], ctx: LayoutContext, absent: list[int],
               source: str = "the checkpoint") -> str:
    """One line: which depths start from Megatron's init, and why."""
    def shown(depths: list[int]) -> str:
        return ", ".join(str(d + 1) for d in depths)

    lacking = [d for d in new if d in absent]
    fresh = f"MTP depths {shown(new)} initialised fresh (Megatron's init by name, train.seed)"
    if lacking:
        return (f"config.json declares {ctx.mtp_layers} MTP depths (num_nextn_predict_layers) "
                f"but no weight file holds depth {shown(lacking)} (save_pretrained and "
                f"fine-tuning tools drop them): imported the main model; {fresh}")
    return f"{fresh}: {source} holds {ctx.mtp_layers}"


def _check_shapes(plan: ImportPlan, hf: HFDirectory, shapes: dict[str, tuple[int, ...]],
                  ctx: LayoutContext) -> None:
    for item in plan.imported:
        expected = expected_hf_shapes(item, shapes[item.megatron], ctx)
        entries = [hf.tensors[name] for name in item.hf]
        for entry, shape in zip(entries, expected, strict=True):
            if entry.shape != shape:
                raise UserError(problems=[Problem(
                    f"{entry.name} is {list(entry.shape)}, but config.json gives {list(shape)}",
                    file=str(entry.file), hint=f"check {hf.config_path}")])
        if len({entry.dtype for entry in entries}) > 1:
            raise UserError(problems=[Problem(
                f"{', '.join(item.hf)} have different dtypes; they form one tensor",
                file=str(entries[0].file))])


def _account_for_every_tensor(plan: ImportPlan, hf: HFDirectory, ctx: LayoutContext,
                              depths: int, mtp_from: str | None) -> None:
    used = {name for item in plan.imported for name in item.hf}
    used |= {name for pair in plan.copies for name in pair}
    beyond = tuple(depth_prefix(hf, ctx, k) for k in range(depths, ctx.mtp_layers))
    leftover = []
    for name in hf.tensors:
        if name in used or IGNORED.match(name):
            continue
        if beyond and name.startswith(beyond):
            plan.skipped.append(name)
        else:
            leftover.append(name)
    if leftover:
        entry = hf.tensors[sorted(leftover)[0]]
        raise UserError(problems=[Problem(
            f"holds tensors config.json does not account for: {_names(sorted(leftover))}",
            file=str(entry.file), hint=f"check {hf.config_path} (model_type, layer counts, "
                                       "num_nextn_predict_layers)")])
    if plan.skipped and mtp_from:
        plan.notes.append(f"the checkpoint's own MTP depths ({ctx.mtp_layers}) are not "
                          f"imported: --mtp-from {mtp_from} gives them")
    elif plan.skipped:
        plan.notes.append(f"MTP depths {depths + 1}..{ctx.mtp_layers} of the checkpoint are not "
                          f"imported (mtp.num_layers is {depths})")
