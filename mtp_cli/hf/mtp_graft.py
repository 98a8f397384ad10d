"""`mtp import HF_DIR --mtp-from OTHER_DIR`: the MTP depths of another checkpoint, grafted.

A fine-tuned model usually comes without its MTP layers (fine-tuning tools drop them), while
the base it was tuned from has them. The depths are taken from OTHER_DIR (a Hugging Face
directory of the same architecture and attention/expert dimensions), tensor for tensor in its
files' dtype, so the graft is bit-exact. Each depth's own tensors are read (`enorm`, `hnorm`,
`eh_proj`, `shared_head.norm`, its decoder layer); its `embed_tokens` / `shared_head.head`
copies are ignored: mtp-cli's depths use the imported model's embedding and head. Every shape
is checked against the imported model's before any value is read (a mismatch names the tensor
and both shapes); depths the spec wants beyond OTHER_DIR's start from Megatron's init.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mtp_cli.errors import Problem, UserError
from mtp_cli.hf.configs import spec_sections
from mtp_cli.hf.hf_files import HFDirectory, open_hf_directory
from mtp_cli.hf.import_plan import ImportPlan, expected_hf_shapes, fresh_note
from mtp_cli.hf.mapping import ARCHITECTURES, Architecture, LayoutContext, file_tensors

# LayoutContext fields a graft must share with the imported model, by config.json key
SAME = {"heads": "num_attention_heads", "query_groups": "num_key_value_heads",
        "head_dim": "head_dim", "qk_head_dim": "qk_nope_head_dim",
        "rope_dim": "qk_rope_head_dim", "num_experts": "n_routed_experts"}


@dataclasses.dataclass
class GraftSource:
    """OTHER_DIR opened, with the sizes its tensors are laid out by."""

    hf: HFDirectory
    ctx: LayoutContext


def open_graft_source(path: Path, model_type: str, ctx: LayoutContext) -> GraftSource:
    """OTHER_DIR, refused unless it is `model_type` with `ctx`'s dimensions and declares MTP
    depths."""
    other = open_hf_directory(Path(path), ARCHITECTURES)
    where = str(other.config_path)
    if other.config["model_type"] != model_type:
        raise UserError(problems=[Problem(
            f"--mtp-from is a {other.config['model_type']} model, the imported one "
            f"{model_type}: the MTP depths must come from the same architecture", file=where)])
    try:
        _, other_ctx = spec_sections(other.config)
    except (UserError, TypeError, ValueError, KeyError, AttributeError) as error:
        raise UserError(problems=[Problem(f"--mtp-from: does not describe a {model_type} "
                                          f"model ({error})", file=where)]) from None
    for field, key in SAME.items():
        mine, theirs = getattr(ctx, field), getattr(other_ctx, field)
        if mine != theirs:
            raise UserError(problems=[Problem(
                f"--mtp-from has {key} {theirs}, the imported model {mine}: the MTP depths "
                "must come from a model of the same dimensions", file=where)])
    if other_ctx.mtp_layers == 0:
        raise UserError(problems=[Problem(
            "--mtp-from declares no MTP depths (num_nextn_predict_layers)", file=where)])
    return GraftSource(other, other_ctx)


def plan_graft(arch: Architecture, source: GraftSource, ctx: LayoutContext,
               shapes: dict[str, tuple[int, ...]], *, depths: int) -> ImportPlan:
    """The imported model's `depths` MTP depths (`shapes`: all its Megatron tensors): the first
    min(depths, OTHER_DIR's) from OTHER_DIR's files, the rest fresh."""
    other, taken = source.hf, min(depths, source.ctx.mtp_layers)
    names = [n for n in shapes if n.startswith("mtp.") and int(n.split(".")[2]) < taken]
    plan = ImportPlan(fresh=[n for n in shapes if n.startswith("mtp.") and n not in names])
    items = file_tensors(arch, dataclasses.replace(source.ctx, mtp_layers=taken), names,
                         tied=False)
    missing = [name for item in items for name in item.hf if name not in other.tensors]
    if missing:
        raise UserError(problems=[Problem(
            f"--mtp-from holds no tensor {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                          if len(missing) > 1 else "")
            + f" of the {taken} MTP depths its config.json declares", file=str(other.config_path))])
    for item in items:
        for name, shape in zip(item.hf, expected_hf_shapes(item, shapes[item.megatron], ctx),
                               strict=True):
            entry = other.tensors[name]
            if entry.shape != shape:
                raise UserError(problems=[Problem(
                    f"{name} is {list(entry.shape)}, but the imported model's {item.megatron} "
                    f"needs {list(shape)}: --mtp-from must have the same dimensions",
                    file=str(entry.file))])
        if len({other.tensors[name].dtype for name in item.hf}) > 1:
            raise UserError(problems=[Problem(f"{', '.join(item.hf)} have different dtypes; "
                                              "they form one tensor", file=str(entry.file))])
    plan.imported = items
    which = "depth 1" if taken == 1 else f"depths 1..{taken}"
    plan.notes.append(f"MTP {which} grafted from {other.root} (their embedding and head copies "
                      "ignored: the depths use the imported model's)")
    if plan.fresh:
        new = sorted({int(n.split(".")[2]) for n in plan.fresh})
        plan.notes.append(fresh_note(new, dataclasses.replace(ctx, mtp_layers=taken), [],
                                     source="--mtp-from"))
    return plan
