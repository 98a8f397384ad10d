"""CHECKPOINT -> a model ready to decode: a run directory, a DCP checkpoint written at any
parallel layout, or a Hugging Face directory written by `mtp export`.

DCP checkpoints are read by tensor name through the allow-listed reader that `mtp inspect-ckpt`
and `mtp export` use (`mtp_cli.inspect.checkpoint`): they hold full tensors under the
single-process names whatever the layout, so the single-device model loads them directly. An
exported directory goes through `mtp import`'s mapping, in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtp_cli.checkpoint.layout import run_dir_of
from mtp_cli.config.schema import RunSpec
from mtp_cli.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from mtp_cli.errors import Problem, UserError
from mtp_cli.gpt import GPTModel

HF_CONFIG = "config.json"


@dataclass
class LoadedModel:
    model: GPTModel
    spec: RunSpec
    tokenizer: ByteTokenizer | HFTokenizer | None
    source: Path  # the checkpoint directory actually read
    run_dir: Path | None  # the run directory it belongs to (None for an exported directory)
    step: int | None
    notes: list[str] = field(default_factory=list)

    @property
    def mtp_depths(self) -> int:
        return 0 if self.model.mtp is None else self.model.mtp.num_depths


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_generation(path: Path, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> LoadedModel:
    """The model of CHECKPOINT `path`, in eval mode on `device` (UserError: exit 2)."""
    path = Path(path)
    device = torch.device(device) if device is not None else default_device()
    if path.is_dir() and (path / HF_CONFIG).is_file() and not (path / ".metadata").exists():
        loaded = _load_hf_directory(path)
    else:
        loaded = _load_checkpoint(path)
    loaded.model.to(device=device, dtype=dtype).eval()
    return loaded


def _build(spec: RunSpec, state: dict[str, torch.Tensor], where: Path) -> GPTModel:
    from mtp_cli.builders.model_builder import build_model
    from mtp_cli.inspect.finite import refuse_nonfinite

    model = build_model(spec, "cpu", initialize=False)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(problems=[Problem(f"lacks {len(missing)} tensors of its spec's model: "
                                          f"{', '.join(missing[:6])}", file=str(where))])
    changed = [n for n, t in expected.items() if tuple(state[n].shape) != tuple(t.shape)]
    if changed:
        raise UserError(problems=[Problem(f"tensor shapes differ from its spec's model: "
                                          f"{', '.join(changed[:6])}", file=str(where))])
    refuse_nonfinite({n: state[n] for n in expected}, where)  # NaN would decode as noise
    model.load_state_dict({n: state[n] for n in expected}, strict=True)
    return model


def _load_checkpoint(path: Path) -> LoadedModel:
    from mtp_cli.inspect.checkpoint import open_checkpoint
    from mtp_cli.inspect.expected import checkpoint_spec

    checkpoint = open_checkpoint(path)
    spec = checkpoint_spec(checkpoint, None, hint="generate and eval read the spec a "
                           "checkpoint stores; export it with `mtp export --spec SPEC.yaml` "
                           "and read the exported directory")
    from mtp_cli.builders.model_builder import state_dict_shapes

    shapes = state_dict_shapes(spec)
    present = [n for n in shapes if n in checkpoint.tensors]
    missing = [n for n in shapes if n not in checkpoint.tensors]
    changed = [n for n in present if tuple(checkpoint.tensors[n].shape) != tuple(shapes[n])]
    if missing or changed:  # before anything is allocated: a stored spec may declare any size
        what = (f"lacks {len(missing)} tensors of its spec's model: {', '.join(missing[:6])}"
                if missing else f"tensor shapes differ from its spec's model: "
                f"{', '.join(changed[:6])}")
        raise UserError(problems=[Problem(what, file=str(checkpoint.path))])
    state = checkpoint.read(present) if present else {}
    model = _build(spec, state, checkpoint.path)
    run_dir = run_dir_of(checkpoint.path) if checkpoint.kind == "dcp" else None
    try:
        tokenizer = load_tokenizer(spec.data.tokenizer, spec.model.vocab_size)
    except UserError as error:
        tokenizer, notes = None, [f"no tokenizer ({error})"]
    else:
        notes = []
    return LoadedModel(model, spec, tokenizer, checkpoint.path, run_dir, checkpoint.step,
                       list(checkpoint.notes) + notes)


def _load_hf_directory(path: Path) -> LoadedModel:
    from mtp_cli.hf.importer import load_hf_model_state
    from mtp_cli.hf.tokenizer_files import byte_tokenizer_json

    spec, state, notes = load_hf_model_state(path)
    model = _build(spec, state, path)
    tokenizer: ByteTokenizer | HFTokenizer | None = None
    tokenizer_file = path / "tokenizer.json"
    if tokenizer_file.is_file():
        try:
            vocab = json.loads(tokenizer_file.read_text(encoding="utf-8"))["model"]["vocab"]
        except (OSError, ValueError, KeyError, TypeError):
            vocab = None
        if vocab == byte_tokenizer_json()["model"]["vocab"]:
            tokenizer = ByteTokenizer()  # the embedded corpus's byte ids, exactly
        else:
            tokenizer = HFTokenizer(tokenizer_file)
    return LoadedModel(model, spec, tokenizer, path, None, None, list(notes))
