"""A Hugging Face model directory read without trusting it: config.json, the weight files and
their tensor index, then values one request at a time.

Weights are safetensors (`model.safetensors`, or shards listed by
`model.safetensors.index.json`) or, failing those, PyTorch `.bin` files read with
`torch.load(weights_only=True)`. Nothing from the directory is ever run: `auto_map` (remote
code) is not honoured. Before any value is read, every shard the index names must be a plain
file of the directory whose header parses and whose data covers every tensor (safetensors
checks that), and every tensor the index assigns to a shard must be in it; each failure names
the file. Values are read with `pread` (no memory map lingers), one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtp_cli.checkpoint.files import is_regular_file, read_json_object
from mtp_cli.checkpoint.torch_archive import check_torch_archive
from mtp_cli.errors import Problem, UserError

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
JSON_LIMIT = 64 * 2**20  # bytes; DeepSeek-V3's index is ~9 MB

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def file_error(path: Path | str, message: str, hint: str | None = None) -> UserError:
    return UserError(problems=[Problem(message, file=str(path), hint=hint)])


def _plain_file(path: Path, what: str) -> None:
    if not path.exists():
        raise file_error(path, f"{what} is missing")
    if not is_regular_file(path):
        raise file_error(path, f"{what} is not a regular file")


def read_json(path: Path, limit: int = JSON_LIMIT) -> dict[str, Any]:
    """A JSON object from a plain file of at most `limit` bytes (the checkpoint readers'
    bounded read: never a FIFO, never past the limit); `UserError` naming the file."""
    return read_json_object(path, limit)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the checkpoint, known from its file's header."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


@dataclass
class HFDirectory:
    """A model directory opened for reading; `read(names)` loads values."""

    root: Path
    config: dict[str, Any]
    tensors: dict[str, TensorEntry]
    kind: str  # "safetensors" | "bin"
    _bin_cache: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG

    def files(self) -> list[Path]:
        return sorted({entry.file for entry in self.tensors.values()})

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The values of `names`, each file opened once per call."""
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        for path, wanted in by_file.items():
            out.update(self._read_file(path, wanted))
        return {name: out[name] for name in names}

    def _read_file(self, path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        if self.kind == "bin":
            loaded = self._bin_cache.get(path)
            if loaded is None:
                self._bin_cache.clear()
                loaded = self._bin_cache[path] = _load_bin(path)
            return ((n, loaded[n]) for n in names)
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu", backend="pread") as handle:
                return iter([(n, handle.get_tensor(n)) for n in names])
        except Exception as error:  # SafetensorError, OSError: the file changed under us
            raise file_error(path, f"does not load ({error})") from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict, after `check_torch_archive` (records hold their storages, no
    stride-0 view presents more elements than it has): `torch.load(mmap=True)` itself would
    read a short record on into its neighbours' bytes."""
    check_torch_archive(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # pickle refused by weights_only, truncated zip, ...
        raise file_error(path, f"does not load with torch.load(weights_only=True) ({error})"
                         ) from None
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor)
                                               for v in loaded.values()):
        raise file_error(path, "does not hold a state dict of tensors")
    return loaded


def _safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype name)} of one safetensors file; `UserError` naming it when it does
    not parse or its data does not cover every tensor."""
    from safetensors import safe_open

    _plain_file(path, "weight file")
    try:
        with safe_open(path, framework="pt", device="cpu", backend="pread") as handle:
            return {name: (tuple(handle.get_slice(name).get_shape()),
                           handle.get_slice(name).get_dtype()) for name in handle.keys()}  # noqa: SIM118
    except Exception as error:
        raise file_error(path, f"is not a complete safetensors file ({error})") from None


def _shard_path(root: Path, index_path: Path, name: Any) -> Path:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise file_error(index_path, f"names shard {name!r}, not a file of the directory")
    return root / name


def _index(root: Path, index_name: str) -> dict[str, Path]:
    """{tensor name: shard path} from an index file."""
    index_path = root / index_name
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise file_error(index_path, "has no 'weight_map' object")
    return {str(k): _shard_path(root, index_path, v) for k, v in weight_map.items()}


def _safetensors_entries(root: Path, assigned: dict[str, Path] | None, index: Path | None
                         ) -> dict[str, TensorEntry]:
    files = sorted(set(assigned.values())) if assigned else [root / SAFETENSORS]
    entries: dict[str, TensorEntry] = {}
    for path in files:
        if not path.exists():
            where = f" (named in {index.name})" if index else ""
            raise file_error(path, f"weight shard{where} is missing")
        for name, (shape, dtype_name) in _safetensors_header(path).items():
            dtype = SAFETENSORS_DTYPES.get(dtype_name)
            if dtype is None:
                raise file_error(path, f"tensor {name} has dtype {dtype_name}, which mtp-cli "
                                       "does not read")
            entries.setdefault(name, TensorEntry(name, path, shape, dtype))
    if assigned:
        for name, path in assigned.items():
            entry = entries.get(name)
            if entry is None or entry.file != path:
                raise file_error(path, f"does not hold tensor {name}, which {index.name} assigns "
                                       "to it")
        entries = {name: entries[name] for name in assigned}
    return entries


def _bin_entries(root: Path) -> dict[str, TensorEntry]:
    assigned = _index(root, BIN_INDEX) if (root / BIN_INDEX).exists() else None
    files = sorted(set(assigned.values())) if assigned else [root / BIN]
    entries: dict[str, TensorEntry] = {}
    for path in files:
        _plain_file(path, "weight file")
        for name, tensor in _load_bin(path).items():
            entries.setdefault(name, TensorEntry(name, path, tuple(tensor.shape), tensor.dtype))
    return entries


def open_hf_directory(root: Path, model_types: Collection[str]) -> HFDirectory:
    """Open model directory `root` (config.json of one of `model_types`, and weights);
    `UserError` naming the file at fault for anything missing, damaged or not what it claims
    to be (the architecture first: nothing else is read for a model we cannot map)."""
    root = Path(root)
    if not root.is_dir():
        raise file_error(root, "is not a directory (a Hugging Face model directory with "
                               "config.json and safetensors files)")
    config = read_json(root / CONFIG)
    check_config_types(root / CONFIG, config)
    model_type = config.get("model_type")
    if model_type not in model_types:
        shown = config.get("architectures") or model_type
        raise file_error(root / CONFIG, f"unknown architecture {shown} (model_type "
                                        f"{model_type!r}): mtp import reads "
                                        f"{', '.join(sorted(model_types))}")
    if (root / SAFETENSORS_INDEX).exists():
        tensors = _safetensors_entries(root, _index(root, SAFETENSORS_INDEX),
                                       root / SAFETENSORS_INDEX)
        kind = "safetensors"
    elif (root / SAFETENSORS).exists():
        tensors, kind = _safetensors_entries(root, None, None), "safetensors"
    elif (root / BIN_INDEX).exists() or (root / BIN).exists():
        tensors, kind = _bin_entries(root), "bin"
    else:
        raise file_error(root, f"holds no weights ({SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} "
                               f"or {BIN_INDEX})")
    refuse_quantized(root, config, tensors)
    return HFDirectory(root, config, tensors, kind)


# config.json keys that size something: an integer of at least 1 when present (0 would divide
# by zero, a float or a string would reach arithmetic that expects a count)
POSITIVE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                 "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_group",
                 "topk_group", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim",
                 "qk_nope_head_dim")


def check_config_types(path: Path, config: dict[str, Any]) -> None:
    """`model_type` a string, `architectures` a list of strings, every size key a positive
    integer: `UserError` naming the file and key (never a TypeError deep in a translation)."""
    def refuse(key: str, what: str) -> UserError:
        shown = repr(config[key])
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return UserError(problems=[Problem(f"is {shown}, not {what}", file=str(path), key=key)])

    if not isinstance(config.get("model_type"), str):
        raise refuse("model_type", "a model type name") if "model_type" in config else \
            file_error(path, "has no 'model_type'")
    architectures = config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list) and all(
            isinstance(a, str) for a in architectures)):
        raise refuse("architectures", "a list of class names")
    for key in POSITIVE_KEYS:
        value = config.get(key)
        if value is not None and not (type(value) is int and value >= 1):
            raise refuse(key, "a positive integer")


def refuse_quantized(root: Path, config: dict[str, Any], tensors: dict[str, TensorEntry]
                     ) -> None:
    """FP8 (or otherwise quantized) weights hold scales, not the weights themselves."""
    scales = [e for e in tensors.values() if e.name.endswith(("weight_scale_inv", "weight_scale"))]
    fp8 = [e for e in tensors.values() if e.dtype.is_floating_point and e.dtype.itemsize == 1]
    if scales or fp8:
        entry = (scales or fp8)[0]
        raise file_error(entry.file, f"holds quantized weights ({entry.name}, "
                         f"{str(entry.dtype).removeprefix('torch.')}): FP8 block-quantized "
                         "checkpoints store scaled values whose real weights need the scales "
                         "applied", hint="dequantize to bf16 first (e.g. DeepSeek's "
                         "fp8_cast_bf16.py), then import that directory")
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise file_error(root / CONFIG, f"declares quantization_config ({method}): only "
                                        "unquantized weights import")
