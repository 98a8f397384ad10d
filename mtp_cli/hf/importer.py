"""`mtp import`: a Hugging Face model directory as an mtp-cli run directory at step 0.

```
RUN_DIR/spec.yaml                        model and mtp from config.json; train/data/parallel
                                         from KEY=VALUE overrides or the defaults
RUN_DIR/tokenizer/tokenizer.json         the model's tokenizer, when it has one (data.tokenizer)
RUN_DIR/checkpoints/step_0000000/        what `mtp train` writes, so that
RUN_DIR/checkpoints/latest               `mtp train RUN_DIR/spec.yaml --run-dir RUN_DIR` resumes
```

Architectures: DeepseekV3ForCausalLM, Glm4MoeForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM
(`model_type`; `auto_map` remote code is never run). The MTP layers present (DeepSeek-V3 layout,
`model.layers.{N+k}`) are imported; their `embed_tokens` / `shared_head.head` copies must equal
the main embedding and head (a differing copy is refused, naming the tensor); depths beyond the
checkpoint's (`mtp.num_layers=D` larger) are initialised fresh by name. Tied embeddings stay
tied. Every check runs on the file headers before any value is read; the values then stream one
Megatron tensor at a time into the checkpoint, each kept in its file's dtype.
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
from mtp_cli.hf.import_plan import ImportPlan, plan_import
from mtp_cli.hf.mapping import ARCHITECTURES, FileTensor, LayoutContext, to_megatron_tensor
from mtp_cli.hf.output_dir import StagedDirectory, check_output
from mtp_cli.hf.step0_checkpoint import write_step0_checkpoint
from mtp_cli.hf.tokenizer_files import keep_tokenizer
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


def _sections(hf: HFDirectory, overrides: list[str]) -> tuple[dict[str, Any], LayoutContext]:
    """The spec as a mapping (config.json's model and mtp sections, the overrides applied)."""
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
    data = copy.deepcopy(sections)
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
        parts = hf.read(list(item.hf))
        return to_megatron_tensor(item.layout, [parts[n] for n in item.hf], ctx).contiguous()
    return produce


def _fresh(name: str, shape: tuple[int, ...], dtype: torch.dtype, spec: RunSpec, scaled: bool
           ) -> Callable[[], torch.Tensor]:
    def produce() -> torch.Tensor:
        if name.endswith("router.expert_bias"):  # the one persistent buffer: zero at init
            return torch.zeros(shape, dtype=dtype)
        return full_initial_value(name, torch.Size(shape), std=spec.model.init_method_std,
                                  scaled=scaled, num_layers=spec.model.num_layers,
                                  seed=spec.train.seed).to(dtype)
    return produce


def _tensor_sources(hf: HFDirectory, plan: ImportPlan, spec: RunSpec, ctx: LayoutContext,
                    shapes: dict[str, tuple[int, ...]], scaled: dict[str, bool]
                    ) -> dict[str, tuple[tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]]:
    sources = {}
    for item in plan.imported:
        dtype = hf.tensors[item.hf[0]].dtype
        sources[item.megatron] = (shapes[item.megatron], dtype, _producer(hf, item, ctx))
    counts: dict[torch.dtype, int] = {}
    for _, dtype, _ in sources.values():
        counts[dtype] = counts.get(dtype, 0) + 1
    main_dtype = max(counts, key=lambda d: counts[d]) if counts else torch.float32
    for name in plan.fresh:
        dtype = torch.float32 if name.endswith("expert_bias") else main_dtype
        sources[name] = (shapes[name], dtype, _fresh(name, shapes[name], dtype, spec,
                                                      scaled.get(name, False)))
    return {name: sources[name] for name in shapes}


def import_model(hf_dir: Path, out: Path, overrides: list[str] | tuple[str, ...] = (), *,
                 overwrite: bool = False) -> ImportResult:
    """Write run directory `out` from Hugging Face model directory `hf_dir` (module doc)."""
    out = Path(out)
    check_output(out, overwrite=overwrite, source=Path(hf_dir))
    hf = open_hf_directory(Path(hf_dir), ARCHITECTURES)
    data, ctx = _sections(hf, list(overrides))
    if (Path(hf_dir) / "tokenizer.json").is_file():
        data.setdefault("data", {}).setdefault(
            "tokenizer", str(out.resolve() / "tokenizer" / "tokenizer.json"))
    spec = load_spec(data)
    shapes, scaled = _shapes_and_init(spec)
    tied = spec.model.share_embeddings_and_output_weights
    arch = ARCHITECTURES[hf.config["model_type"]]
    plan = plan_import(arch, ctx, hf, shapes, tied=tied, depths=mtp_depths(spec))
    _check_copies(hf, plan)
    sources = _tensor_sources(hf, plan, spec, ctx, shapes, scaled)
    architecture = (hf.config.get("architectures") or [arch.name])[0]
    with StagedDirectory(out, overwrite=overwrite, source=Path(hf_dir)) as temp:
        keep_tokenizer(Path(hf_dir), temp)
        header = SPEC_HEADER.format(source=Path(hf_dir).resolve(), architecture=architecture,
                                    spec=out / "spec.yaml", run_dir=out)
        (temp / "spec.yaml").write_text(header + yaml.safe_dump(data, sort_keys=False))
        largest_file = max(path.stat().st_size for path in hf.files())
        write_step0_checkpoint(temp, spec, sources, {"imported_from": {
            "path": str(Path(hf_dir).resolve()), "architecture": architecture,
            "fresh": plan.fresh}}, file_bytes=largest_file)
    return ImportResult(out, architecture, len(plan.imported), plan.fresh, plan.notes)


def load_hf_model_state(hf_dir: Path) -> tuple[RunSpec, dict[str, torch.Tensor], list[str]]:
    """The spec and the Megatron-named state dict of Hugging Face model directory `hf_dir`
    (e.g. one `mtp export` wrote), in memory: `mtp import`'s checks and name mapping without
    writing a run directory (`mtp generate` and `mtp eval` read exported models this way)."""
    hf = open_hf_directory(Path(hf_dir), ARCHITECTURES)
    data, ctx = _sections(hf, [])
    spec = load_spec(data)
    shapes, scaled = _shapes_and_init(spec)
    arch = ARCHITECTURES[hf.config["model_type"]]
    plan = plan_import(arch, ctx, hf, shapes, tied=spec.model.share_embeddings_and_output_weights,
                       depths=mtp_depths(spec))
    _check_copies(hf, plan)
    sources = _tensor_sources(hf, plan, spec, ctx, shapes, scaled)
    return spec, {name: produce() for name, (_, _, produce) in sources.items()}, plan.notes
