"""Whether a run directory's checkpoint can resume training of a spec, checked before launch.

The checkpoint is the one `RunDir.resolve` picks (an integrity failure falls back to an older
one there). Then, never falling back: the model must be the same - the `model` section, the MTP
depth, the `modules` tree, and above all the parameter names and shapes, compared between the
checkpoint's `.metadata` and the new model built on the meta device (so a norm replaced by
`IdentityOp` is named) - and so must the global batch (the data position is counted in global
batches), and so must the data (its sources: `data_change`), unless `data.allow_data_change`
restarts the data stream. A changed learning-rate schedule is allowed and said in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata

from mtp_cli.checkpoint import ValidCheckpoint, tensor_entries
from mtp_cli.checkpoint.layout import meta_path
from mtp_cli.checkpoint.run_dir import RunDir
from mtp_cli.config.schema import RunSpec, TrainConfig
from mtp_cli.errors import Problem, UserError
from mtp_cli.train.optim import lr_at

MODEL_PREFIX = "model."
SCHEDULE_KEYS = ("steps", "decay_steps", "warmup_steps", "lr", "min_lr")
NAMED = 6  # parameter names shown per kind of difference


@dataclass
class ResumePlan:
    """What a launch resumes from, and what to tell the user about it."""

    checkpoint: ValidCheckpoint | None
    warnings: list[str] = field(default_factory=list)
    schedule_note: str | None = None

    @property
    def step(self) -> int | None:
        return self.checkpoint.step if self.checkpoint is not None else None


@dataclass
class KeyDiff:
    """Parameter names that differ between a checkpoint and a model."""

    missing: list[str]  # the model has them, the checkpoint does not
    unexpected: list[str]  # the checkpoint has them, the model does not
    changed: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # name, stored, model

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.changed)

    def problems(self) -> list[Problem]:
        out = []
        if self.missing:
            out.append(Problem(f"the new model has parameters the checkpoint lacks: "
                               f"{_names(self.missing)}"))
        if self.unexpected:
            out.append(Problem(f"the checkpoint stores parameters the new model lacks: "
                               f"{_names(self.unexpected)}"))
        if self.changed:
            shown = [f"{n} {list(old)} -> {list(new)}" for n, old, new in self.changed]
            out.append(Problem(f"parameter shapes changed: {_names(shown)}"))
        return out


def _names(names: list[str]) -> str:
    more = f" and {len(names) - NAMED} more" if len(names) > NAMED else ""
    return ", ".join(names[:NAMED]) + more


def key_diff(metadata: Metadata, expected: dict[str, tuple[int, ...]]) -> KeyDiff:
    """Compare the checkpoint's `model.*` tensors with `expected` names and shapes."""
    stored = {key[len(MODEL_PREFIX):]: tuple(int(s) for s in entry.size)
              for key, entry in tensor_entries(metadata).items() if key.startswith(MODEL_PREFIX)}
    return KeyDiff(
        missing=sorted(set(expected) - set(stored)),
        unexpected=sorted(set(stored) - set(expected)),
        changed=[(n, stored[n], expected[n]) for n in sorted(set(stored) & set(expected))
                 if stored[n] != expected[n]],
    )


def _changed_sections(stored: Any, current: dict[str, Any]) -> list[str]:
    """The spec parts that define the model and differ from the stored spec."""
    if not isinstance(stored, dict):
        return []
    changed = []
    for section, key in (("model", None), ("mtp", "num_layers"), ("mtp", "use_repeated_layer"),
                         ("modules", None)):
        if section not in stored:
            continue  # an older meta.json without the section: the key check decides
        old = stored[section] if key is None else _get(stored[section], key)
        new = current[section] if key is None else current[section][key]
        if old != new:
            changed.append(section if key is None else f"{section}.{key}")
    return changed


def _get(section: Any, key: str) -> Any:
    return section.get(key) if isinstance(section, dict) else None


def check_same_model(spec: RunSpec, checkpoint: ValidCheckpoint, *, allow_imports: bool = False,
                     shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """`UserError` naming the changed sections and parameters when `spec`'s model is not the
    checkpoint's; `shapes`: the model's state-dict shapes if the caller built it (the
    launcher's one meta build), else a meta build here."""
    from mtp_cli.builders.model_builder import state_dict_shapes

    stored = checkpoint.meta.spec
    sections = _changed_sections(stored, spec.model_dump(mode="json"))
    if shapes is None:
        shapes = state_dict_shapes(spec, allow_imports=allow_imports)
    diff = key_diff(checkpoint.metadata, shapes)
    if not sections and not diff:
        return
    where = ", ".join(sections) or "the model"
    verb = "differ" if len(sections) > 1 else "differs"
    raise UserError(problems=[
        Problem(f"{where} {verb} from the checkpoint in {checkpoint.path}",
                key=sections[0] if sections else None,
                hint="pass --overwrite to start afresh, or another --run-dir"),
        *diff.problems(),
    ])


def check_same_batch(spec: RunSpec, checkpoint: ValidCheckpoint) -> None:
    stored = checkpoint.meta.spec
    train = stored.get("train") if isinstance(stored, dict) else None
    old = train.get("global_batch_size") if isinstance(train, dict) else None
    if old != spec.train.global_batch_size:
        raise UserError(problems=[Problem(
            f"the checkpoint {checkpoint.path.name} was trained with global batches of {old}; "
            f"its data position cannot move to {spec.train.global_batch_size}",
            key="train.global_batch_size", hint="keep the batch size, or --overwrite")])


DATA_KEYS = ("path", "blend", "val_fraction", "tokenizer")


def data_change(spec: RunSpec, checkpoint: ValidCheckpoint) -> str | None:
    """`UserError` when the data sources differ from the checkpoint's spec (its data position
    is a position in those); with `data.allow_data_change`, the line that says the stream
    restarts. (Changed files under the same paths are caught by the loader's fingerprint.)"""
    stored = checkpoint.meta.spec.get("data") if checkpoint.meta.spec else None
    stored = stored if isinstance(stored, dict) else {}
    current = spec.data.model_dump(mode="json")
    changed = [f"data.{key} {stored.get(key)!r} -> {current.get(key)!r}"
               for key in DATA_KEYS if stored.get(key) != current.get(key)]
    if not changed:
        return None
    if spec.data.allow_data_change:
        return (f"the data changed since {checkpoint.path.name} ({'; '.join(changed)}): "
                f"data.allow_data_change: the data stream restarts from its first sample")
    raise UserError(problems=[Problem(
        f"the checkpoint {checkpoint.path.name} was trained on other data ({'; '.join(changed)})"
        f": its data position means nothing on this data", key="data",
        hint="set data.allow_data_change: true to restart the data stream, or --overwrite")])


def schedule_change(stored_train: Any, train: TrainConfig, step: int) -> str | None:
    """One line when the learning-rate schedule differs from the checkpoint's, with the rate
    the next step gets under each; None when it is the same."""
    if not isinstance(stored_train, dict):
        return None
    try:
        old = TrainConfig.model_validate(stored_train)
    except ValueError:
        return None
    changes = [f"train.{key} {getattr(old, key)} -> {getattr(train, key)}"
               for key in SCHEDULE_KEYS if getattr(old, key) != getattr(train, key)]
    if not changes:
        return None
    return (f"the learning-rate schedule differs from the checkpoint's ({', '.join(changes)}): "
            f"step {step + 1} uses lr {lr_at(step, train):.4g} (the checkpoint's schedule: "
            f"{lr_at(step, old):.4g})")


def plan_resume(spec: RunSpec, run_dir: RunDir, *, allow_imports: bool = False,
                shapes: dict[str, tuple[int, ...]] | None = None) -> ResumePlan:
    """The checkpoint a launch resumes from, after every check; `UserError` (exit 2) when it
    cannot resume this spec or when checkpoints exist and none validates."""
    resolution = run_dir.resolve()
    checkpoint = resolution.checkpoint
    plan = ResumePlan(checkpoint, list(resolution.warnings))
    if checkpoint is None:
        return plan
    if checkpoint.meta.spec is None:
        raise UserError(problems=[Problem(
            "stores no spec: cannot tell whether it holds this model",
            file=str(meta_path(checkpoint.path)), hint="--overwrite starts afresh")])
    check_same_model(spec, checkpoint, allow_imports=allow_imports, shapes=shapes)
    check_same_batch(spec, checkpoint)
    note = data_change(spec, checkpoint)
    if note is not None:
        plan.warnings.append(note)
    plan.schedule_note = schedule_change(checkpoint.meta.spec.get("train"), spec.train,
                                         checkpoint.step)
    return plan
