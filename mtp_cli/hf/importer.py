"""`mtp import`: a Hugging Face model directory as an mtp-cli run directory at step 0.

```
RUN_DIR/spec.yaml                        model and mtp from config.json; train and mtp settings
                                         from mtp_cli_training.json (what `mtp export` records)
                                         or the defaults; KEY=VALUE overrides on top
RUN_DIR/tokenizer/tokenizer.json         the model's tokenizer, when it has one (data.tokenizer)
RUN_DIR/checkpoints/step_0000000/        what `mtp train` writes, so that
RUN_DIR/checkpoints/latest               `mtp train RUN_DIR/spec.yaml --run-dir RUN_DIR` resumes
```

Architectures: DeepseekV3ForCausalLM, Glm4MoeForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM
(`model_type`; `auto_map` remote code is never run). The MTP layers present (DeepSeek-V3 layout,
`model.layers.{N+k}`) are imported; their `embed_tokens` / `shared_head.head` copies must equal
the main embedding and head (a differing copy is refused, naming the tensor); depths beyond the
checkpoint's (`mtp.num_layers=D` larger), or declared by config.json but held by no file, are
initialised fresh by name; `mtp_from` takes them from another checkpoint instead
(`mtp_cli.hf.mtp_graft`). Tied embeddings stay tied. Every check runs on the file headers
before any value is read; the values then stream one Megatron tensor at a time into the
checkpoint, each kept in its file's dtype.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mtp_cli.builders.init import full_initial_value
from mtp_cli.config.loader import apply_overrides, load_spec
from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import Problem, UserError
from mtp_cli.hf.configs import spec_sections
from mtp_cli.hf.hf_files import HFDirectory, open_hf_directory
from mtp_cli.hf.import_plan import ImportPlan, absent_depths, plan_import
from mtp_cli.hf.mapping import ARCHITECTURES, FileTensor, LayoutContext, to_megatron_tensor
from mtp_cli.hf.mtp_graft import GraftSource, open_graft_source, plan_graft
from mtp_cli.hf.output_dir import StagedDirectory, check_output
from mtp_cli.hf.step0_checkpoint import write_step0_checkpoint
from mtp_cli.hf.tokenizer_files import keep_tokenizer, read_kept_tokenizer
from mtp_cli.hf.training_record import apply_training_record, defaults_note, read_training_record
from mtp_cli.plan.run_plan import mtp_depths

DEFAULT_SEQ_LENGTH = 4096
SPEC_HEADER = ("# Imported by `mtp import` from {source} ({architecture}).\n"
               "# Train (resumes its step-0 checkpoint): mtp train {spec} --run-dir {run_dir}\n")


@dataclass
class ImportResult:
    run_dir: Path
    architecture: str
    imported: int
    fresh: list[str]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "architecture": self.architecture,
                "imported_tensors": self.imported, "fresh_tensors": len(self.fresh),
                "notes": self.notes}


def _config_error(hf: HFDirectory, error: UserError) -> UserError:
    return UserError(problems=[Problem(p.render(), file=str(hf.config_path))
                               for p in error.problems])


def _config_sections(hf: HFDirectory) -> tuple[dict[str, Any], LayoutContext]:
    """config.json's model and mtp sections, checked to describe a valid model."""
    model_type = hf.config["model_type"]
    max_positions = hf.config.get("max_position_embeddings")
    seq_length = min(max_positions, DEFAULT_SEQ_LENGTH) if isinstance(max_positions, int) \
        else DEFAULT_SEQ_LENGTH
    try:
        sections, context = spec_sections(hf.config, seq_length=seq_length)
        load_spec(sections)  # config.json alone must describe a valid model
    except UserError as error:
        raise _config_error(hf, error) from None
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise UserError(problems=[Problem(f"does not describe a {model_type} model ({error})",
                                          file=str(hf.config_path))]) from None
    return copy.deepcopy(sections), context


def _sections(hf: HFDirectory, overrides: list[str]) -> tuple[dict[str, Any], LayoutContext]:
    """The spec as a mapping (config.json's model and mtp sections, the overrides applied)."""
    data, context = _config_sections(hf)
    apply_overrides(data, overrides)
    return data, context


def _shapes_and_init(spec: RunSpec) -> tuple[dict[str, tuple[int, ...]], dict[str, bool]]:
    """Every Megatron tensor's shape, and whether its init is scaled (meta device)."""
    from mtp_cli.builders.model_builder import build_model

    model = build_model(spec, "meta")
    scaled = {f"{m}.{p}" if m else p: bool(getattr(module, "scaled_init", False))
              for m, module in model.named_modules()
              for p, _ in module.named_parameters(recurse=False)}
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, scaled


def _check_copies(hf: HFDirectory, plan: ImportPlan) -> None:
    """An MTP depth's `embed_tokens` / `shared_head.head` (or a tied `lm_head`) must be the
    main tensor: mtp-cli shares one embedding and head between the model and its depths."""
    for name, main in plan.copies:
        values = hf.read([name, main])
        same = values[name].dtype == values[main].dtype and torch.equal(values[name],
                                                                        values[main])
        del values
        if not same:
            raise UserError(problems=[Problem(
                f"{name} differs from {main}: mtp-cli's MTP depths share the main model's "
                "embedding and output head, so a checkpoint whose copies differ cannot be "
                "imported without changing the model", file=str(hf.tensors[name].file))])


def _producer(hf: HFDirectory, item: FileTensor, ctx: LayoutContext
              ) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        from mtp_cli.inspect.finite import refuse_nonfinite

        parts = hf.read(list(item.hf))
        refuse_nonfinite(parts, hf.tensors[item.hf[0]].file)
        return to_megatron_tensor(item.layout, [parts[n] for n in item.hf], ctx).contiguous()
    return produce


def _check_floating(hf: HFDirectory, item: FileTensor) -> None:
    """Every weight of the model is floating point: an integer or bool tensor in its place
    would be cast silently, and decode as NUL bytes."""
    for name in item.hf:
        entry = hf.tensors[name]
        if not entry.dtype.is_floating_point:
            raise UserError(problems=[Problem(
                f"tensor {name} is {str(entry.dtype).removeprefix('torch.')}, not a floating-"
                "point weight", file=str(entry.file))])


def _fresh(name: str, shape: tuple[int, ...], dtype: torch.dtype, spec: RunSpec, scaled: bool
           ) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        if name.endswith("router.expert_bias"):  # the one persistent buffer: zero at init
            return torch.zeros(shape, dtype=dtype)
        return full_initial_value(name, torch.Size(shape), std=spec.model.init_method_std,
                                  scaled=scaled, num_layers=spec.model.num_layers,
                                  seed=spec.train.seed).to(dtype)
    return produce


Sources = dict[str, tuple[tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]]


def _tensor_sources(plans: list[tuple[HFDirectory, LayoutContext, ImportPlan]], spec: RunSpec,
                    shapes: dict[str, tuple[int, ...]], scaled: dict[str, bool]) -> Sources:
    """Every Megatron tensor's shape, dtype and producer: read from the directory whose plan
    imports it (in its file's dtype), or fresh in the dtype most tensors have."""
    sources: Sources = {}
    for hf, ctx, plan in plans:
        for item in plan.imported:
            _check_floating(hf, item)
            dtype = hf.tensors[item.hf[0]].dtype
            sources[item.megatron] = (shapes[item.megatron], dtype, _producer(hf, item, ctx))
    counts: dict[torch.dtype, int] = {}
    for _, dtype, _ in sources.values():
        counts[dtype] = counts.get(dtype, 0) + 1
    main_dtype = max(counts, key=lambda d: counts[d]) if counts else torch.float32
    for name in (name for _, _, plan in plans for name in plan.fresh):
        dtype = torch.float32 if name.endswith("expert_bias") else main_dtype
        sources[name] = (shapes[name], dtype, _fresh(name, shapes[name], dtype, spec,
                                                      scaled.get(name, False)))
    return {name: sources[name] for name in shapes}


def _override_keys(overrides: list[str]) -> set[str]:
    return {text.partition("=")[0].strip() for text in overrides}


def _import_sections(hf: HFDirectory, overrides: list[str], graft: Path | None
                     ) -> tuple[dict[str, Any], LayoutContext, GraftSource | None, list[str]]:
    """The spec mapping of an import: config.json's model, the recorded training settings (or
    the defaults, said in a note), `--mtp-from`'s depth count, then the overrides."""
    data, ctx = _config_sections(hf)
    source = None if graft is None else open_graft_source(graft, hf.config["model_type"], ctx)
    if source is not None:
        data["mtp"]["num_layers"] = source.ctx.mtp_layers
    record = read_training_record(hf.root)
    if record is not None:
        apply_training_record(data, record)
    apply_overrides(data, overrides)
    notes = []
    if record is None:
        notes.append(defaults_note(load_spec(data), _override_keys(overrides)))
    return data, ctx, source, notes


def import_model(hf_dir: Path, out: Path, overrides: list[str] | tuple[str, ...] = (), *,
                 overwrite: bool = False, mtp_from: Path | None = None) -> ImportResult:
    """Write run directory `out` from Hugging Face model directory `hf_dir` (module doc);
    `mtp_from`: a directory of the same architecture whose MTP depths are taken instead."""
    out = Path(out)
    inputs = [Path(hf_dir)] + ([Path(mtp_from)] if mtp_from is not None else [])
    check_output(out, overwrite=overwrite, sources=inputs, replace_run=True)
    hf = open_hf_directory(Path(hf_dir), ARCHITECTURES)
    data, ctx, graft, notes = _import_sections(hf, list(overrides), mtp_from)
    tokenizer = read_kept_tokenizer(Path(hf_dir))
    if tokenizer:
        data.setdefault("data", {}).setdefault(
            "tokenizer", str(out.resolve() / "tokenizer" / "tokenizer.json"))
    spec = load_spec(data)
    shapes, scaled = _shapes_and_init(spec)
    tied = spec.model.share_embeddings_and_output_weights
    arch = ARCHITECTURES[hf.config["model_type"]]
    depths = mtp_depths(spec)
    plan = plan_import(arch, ctx, hf, shapes, tied=tied, depths=depths,
                       mtp_from=None if graft is None else str(graft.hf.root))
    plans = [(hf, ctx, plan)]
    if graft is not None:  # every header check before the first value is read
        plans.append((graft.hf, graft.ctx, plan_graft(arch, graft, ctx, shapes,
                                                      depths=depths)))
    _check_copies(hf, plan)
    sources = _tensor_sources(plans, spec, shapes, scaled)
    fresh = [name for _, _, p in plans for name in p.fresh]
    architecture = (hf.config.get("architectures") or [arch.name])[0]
    provenance = {"path": str(Path(hf_dir).resolve()), "architecture": architecture,
                  "fresh": fresh}
    if graft is not None:
        provenance["mtp_from"] = str(graft.hf.root.resolve())
    staged = StagedDirectory(out, overwrite=overwrite, sources=inputs, replace_run=True,
                             tool="mtp import")
    with staged as temp:
        keep_tokenizer(tokenizer, temp)
        header = SPEC_HEADER.format(source=Path(hf_dir).resolve(), architecture=architecture,
                                    spec=out / "spec.yaml", run_dir=out)
        (temp / "spec.yaml").write_text(header + yaml.safe_dump(data, sort_keys=False))
        largest_file = max(path.stat().st_size for d, _, _ in plans for path in d.files())
        write_step0_checkpoint(temp, spec, sources, {"imported_from": provenance},
                               file_bytes=largest_file)
    imported = sum(len(p.imported) for _, _, p in plans)
    notes += [f"removed {p}, left by an export or import that was killed" for p in staged.removed]
    return ImportResult(out, architecture, imported, fresh,
                        notes + [note for _, _, p in plans for note in p.notes])


def load_hf_model_state(hf_dir: Path) -> tuple[RunSpec, dict[str, torch.Tensor], list[str]]:
    """The spec and the Megatron-named state dict of Hugging Face model directory `hf_dir`
    (e.g. one `mtp export` wrote), in memory: `mtp import`'s checks and name mapping without
    writing a run directory (`mtp generate` and `mtp eval` read exported models this way)."""
    hf = open_hf_directory(Path(hf_dir), ARCHITECTURES)
    data, ctx = _sections(hf, [])
    absent, notes = absent_depths(hf, ctx), []
    if absent:  # fresh depths would only draft noise: the model as its files hold it
        data["mtp"]["num_layers"] = absent[0]
        notes.append(f"config.json declares {ctx.mtp_layers} MTP depths, the weight files hold "
                     f"{absent[0]}: loaded with those")
    spec = load_spec(data)
    shapes, scaled = _shapes_and_init(spec)
    arch = ARCHITECTURES[hf.config["model_type"]]
    plan = plan_import(arch, ctx, hf, shapes, tied=spec.model.share_embeddings_and_output_weights,
                       depths=mtp_depths(spec))
    _check_copies(hf, plan)
    sources = _tensor_sources([(hf, ctx, plan)], spec, shapes, scaled)
    return spec, {name: produce() for name, (_, _, produce) in sources.items()}, \
        notes + plan.notes
