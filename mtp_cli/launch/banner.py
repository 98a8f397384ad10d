"""What `mtp train` says before step 1, and what `--overwrite` is about to remove.

The launcher already holds the validated spec, the parallel sizes, the data and the run
directory, so it says once, before any worker starts, what the job will do: the model's size,
the world and its layout, where results go, whether it resumes, and what it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtp_cli.checkpoint.layout import checkpoint_name, is_published
from mtp_cli.checkpoint.run_dir import RunDir
from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import Problem, UserError
from mtp_cli.plan.run_plan import RunPlan

if TYPE_CHECKING:
    from torch.nn import Module


@dataclass(frozen=True)
class DataSummary:
    """The training data as the launcher found it."""

    source: str  # a resolved path, or the default corpus
    documents: int
    train_tokens: int
    val_tokens: int
    # a blend's datasets: (path, weight, share of the run's samples it contributes)
    blend: tuple[tuple[str, float, float], ...] = ()


def blend_fractions(spec: RunSpec, train_set: Any) -> tuple[tuple[str, float, float], ...]:
    """Each blended dataset's weight and the share of the run's samples it gives (none for a
    single corpus): what the blend promises, shown before step 1."""
    if spec.data.blend is None:
        return ()
    total = sum(entry.weight for entry in spec.data.blend)
    samples = spec.train.steps * spec.train.global_batch_size
    return tuple((part.source, entry.weight / total, share) for part, entry, share in zip(
        train_set.parts, spec.data.blend, train_set.fractions(samples), strict=True))


def data_summary(spec: RunSpec, train_documents: int, train_tokens: int,
                 val_tokens: int, blend: tuple[tuple[str, float, float], ...] = ()
                 ) -> DataSummary:
    path = spec.data.path
    source = str(Path(path).resolve()) if path is not None else \
        "the default corpus (the Python standard library's sources, byte-tokenized)"
    if spec.data.synthetic is not None:
        from mtp_cli.data.synthetic import describe

        source = describe(spec.data.synthetic)
    if spec.data.blend is not None:
        source = f"a blend of {len(spec.data.blend)} datasets"
    return DataSummary(source, train_documents, train_tokens, val_tokens, blend)


def meta_model(spec: RunSpec, *, allow_imports: bool) -> Module:
    """The whole model, built once on the meta device (no memory): the launcher counts its
    parameters and compares its tensors with a checkpoint's; a model that does not build there
    is refused before any worker starts."""
    from mtp_cli.builders.model_builder import build_model

    try:
        return build_model(spec, "meta", allow_imports=allow_imports)
    except UserError:
        raise
    except Exception as error:  # a module given in `modules` that rejects its arguments
        raise UserError(problems=[Problem(
            f"the model does not build ({type(error).__name__}: {str(error)[:300]})",
            key="modules" if spec.modules.decoder_layer or spec.modules.mtp_layer else "model",
        )]) from None


def start_banner(plan: RunPlan, run_dir: RunDir, *, parameters: int,
                 nproc: int, nnodes: int, resume_step: int | None, data: DataSummary,
                 resume_checkpoint: str | None = None) -> str:
    """Three lines (and one per blended dataset): the model and the world, the run directory and the start (the checkpoint
    resumed from: `resume_checkpoint`, default the step's name), the data."""
    spec, dims, depths = plan.spec, plan.dims, plan.depths
    assert dims is not None, "the launcher's plan knows its world size"
    layout = f"data {dims.dp} x tensor {dims.tp} x pipeline {dims.pp} x context {dims.cp}"
    if spec.parallel.expert > 1:  # carved from data x context, not a factor of the world
        layout += f", expert {spec.parallel.expert} of data x context"
    nodes = f"{nnodes} node{'s' if nnodes > 1 else ''} x {nproc} process" \
            f"{'es' if nproc > 1 else ''}"
    start = (f"resuming from step {resume_step} of {spec.train.steps} (checkpoint "
             f"{resume_checkpoint or checkpoint_name(resume_step)})" if resume_step is not None
             else f"fresh start, {spec.train.steps} steps")
    per_step = spec.train.global_batch_size * spec.model.seq_length
    return "\n".join([
        f"mtp train: {parameters:,} parameters (D={depths} MTP depth{'s' if depths != 1 else ''}"
        f"), world size {dims.world_size} = {layout} ({nodes})",
        f"run directory {run_dir.root.resolve()}: {start}",
        f"data: {data.source}: {data.documents:,} training documents, {data.train_tokens:,} "
        f"training tokens ({data.val_tokens:,} held out); {spec.train.global_batch_size} x "
        f"{spec.model.seq_length} = {per_step:,} tokens per step",
        *(f"  blend: {share:6.2%} of the samples (weight {weight:.4f}) from {source}"
          for source, weight, share in data.blend),
    ])


def overwrite_summary(run_dir: RunDir) -> str | None:
    """What `--overwrite` removes (metrics.jsonl, tb/, checkpoints/), or None when none exist."""
    removed = []
    if run_dir.checkpoints.is_dir():
        names = sorted(p.name for p in run_dir.checkpoints.iterdir() if is_published(p.name))
        newest = f", newest {names[-1]}" if names else ""
        removed.append(f"checkpoints/ ({len(names)} checkpoint{'s' if len(names) != 1 else ''}"
                       f"{newest})")
    if run_dir.metrics.is_file():
        with open(run_dir.metrics, "rb") as handle:
            lines = sum(1 for _ in handle)
        removed.append(f"metrics.jsonl ({lines:,} line{'s' if lines != 1 else ''})")
    if run_dir.tb.is_dir():
        removed.append("tb/")
    if not removed:
        return None
    return f"--overwrite: removed {', '.join(removed)} from {run_dir.root}"
