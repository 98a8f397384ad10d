"""The training settings an export came with, kept beside its weights (`mtp_cli_training.json`).

A Hugging Face `config.json` describes the model, not how it was trained: without a record,
`mtp import` of an export would start the run again from mtp-cli's defaults (an MTP loss scale
of 0.1 where the run used 0.3, a global batch of 8 where it used 16). `mtp export` writes the
spec's `train` and `mtp` sections and `model.seq_length` (the tokens of one training sample,
which `max_position_embeddings` does not give) to `DIR/mtp_cli_training.json`, a file that
transformers, vLLM and SGLang never read; `mtp import` reads it back as untrusted input (a
plain file of at most 256 KiB, strict JSON, every section validated by the spec's own schema,
unknown keys refused) and applies it under the KEY=VALUE overrides. `mtp.num_layers` stays
what config.json declares: it describes the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from mtp_cli import __version__
from mtp_cli.checkpoint.files import read_json_object
from mtp_cli.config.base import StrictModel
from mtp_cli.config.schema import MTPConfig, RunSpec
from mtp_cli.config.train_config import TrainConfig
from mtp_cli.errors import Problem, UserError

RECORD = "mtp_cli_training.json"
RECORD_FORMAT = "mtp-cli training settings v1"
RECORD_LIMIT = 256 * 2**10  # bytes; a full train + mtp section is ~2 KB
DEFAULTS_SHOWN = ("train.global_batch_size", "train.micro_batch_size", "train.lr",
                  "train.steps", "mtp.loss_scaling_factor")


class RecordedModel(StrictModel):
    seq_length: int = Field(gt=0, description="Tokens per training sample.")


class TrainingRecord(StrictModel):
    """What `mtp_cli_training.json` may hold (nothing else)."""

    format: Literal["mtp-cli training settings v1"]
    mtp_cli_version: str = Field(max_length=64)
    model: RecordedModel
    mtp: MTPConfig
    train: TrainConfig


def training_record(spec: RunSpec) -> dict[str, Any]:
    """The record `mtp export` writes for a run of `spec`."""
    return {"format": RECORD_FORMAT, "mtp_cli_version": __version__,
            "model": {"seq_length": spec.model.seq_length},
            "mtp": spec.mtp.model_dump(mode="json"),
            "train": spec.train.model_dump(mode="json")}


def read_training_record(hf_dir: Path) -> dict[str, Any] | None:
    """`{model: {seq_length}, mtp: ..., train: ...}` from `hf_dir`'s record, validated; None
    when the directory has none. A damaged or hostile record is a `UserError` naming it."""
    path = Path(hf_dir) / RECORD
    if not path.exists() and not path.is_symlink():
        return None
    raw = read_json_object(path, RECORD_LIMIT)
    try:
        record = TrainingRecord.model_validate(raw)
    except ValidationError as error:
        problems = []
        for item in error.errors()[:6]:
            key = ".".join(str(part) for part in item["loc"]) or None
            problems.append(Problem(item["msg"], file=str(path), key=key,
                                    hint=f"written by `mtp export`; delete {RECORD} to import "
                                         "with the defaults"))
        raise UserError(problems=problems) from None
    sections = record.model_dump(mode="json", include={"model", "mtp", "train"})
    del sections["mtp"]["num_layers"]  # config.json's num_nextn_predict_layers governs
    return sections


def apply_training_record(data: dict[str, Any], record: dict[str, Any]) -> None:
    """Put the recorded sections into spec mapping `data` (before the overrides)."""
    data.setdefault("train", {}).update(record["train"])
    data.setdefault("mtp", {}).update(record["mtp"])
    data["model"]["seq_length"] = record["model"]["seq_length"]


def defaults_note(spec: RunSpec, overridden: set[str]) -> str:
    """The one line `mtp import` prints for a directory without a record."""
    values = {key: getattr(getattr(spec, key.split(".")[0]), key.split(".")[1])
              for key in DEFAULTS_SHOWN if key not in overridden}
    shown = ", ".join(f"{key}={value}" for key, value in values.items())
    if "model.seq_length" not in overridden:
        shown += (", " if shown else "") + f"model.seq_length={spec.model.seq_length}"
    return f"no {RECORD} (written by mtp export): defaults used: {shown or 'none'}"
