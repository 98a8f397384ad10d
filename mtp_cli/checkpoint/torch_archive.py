"""A `torch.save` zip archive checked before `torch.load` touches it: every reader of a `.bin`
(import, generate and eval of a model directory, inspect-ckpt and export of a state-dict file)
calls `check_torch_archive` first.

`torch.load(mmap=True)` takes a storage's bytes from the record's offset at the size the pickle
declares, not at the record's own size: a record cut short is read on into its neighbours'
bytes, silently. And a few bytes of pickle can present a stride-0 view of any size
(`zeros(1).expand(2**26, 4096)`), which every copy, cast or comparison then materialises. So,
without reading any tensor data:

- every member is stored uncompressed (as `torch.save` writes it) inside the file;
- `data.pkl` is unpickled with the allow-list unpickler, each storage built on the meta device
  after its record is checked to hold the bytes the pickle declares for it;
- every tensor is backed by its storage element for element (`check_tensors_backed`).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mtp_cli.checkpoint.declared_sizes import check_tensors_backed
from mtp_cli.checkpoint.safe_pickle import StorageRef, TorchArchiveUnpickler, read_checked_pickle
from mtp_cli.errors import UserError

# The first bytes of torch's pre-1.6 (non-zip) format: a protocol-2 pickle of its magic number.
LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def check_member(path: Path, info: zipfile.ZipInfo, file_size: int) -> None:
    """A member is stored uncompressed (as torch.save writes it) and lies inside the file, so
    that reading it never takes more than the file holds (no zip bomb, no declared giant)."""
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size or \
            info.header_offset + info.file_size > file_size:
        raise UserError(f"{path}: archive member {info.filename} declares {info.file_size:,} "
                        "bytes that the file does not hold as stored data; refusing to read it")


def refuse_legacy_format(path: Path) -> None:
    """torch's legacy loader allocates every storage at the size the file declares before
    reading it; such files are refused rather than trusted."""
    with open(path, "rb") as handle:
        head = handle.read(len(LEGACY_MAGIC))
    if head == LEGACY_MAGIC:
        raise UserError(f"{path}: saved in torch's pre-1.6 legacy format, which is not read "
                        "(its storages would be allocated at sizes the file declares); "
                        "re-save it with a current torch.save")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def check_torch_archive(path: Path) -> None:
    """`path` is a zip-format torch.save file whose records hold every storage's declared bytes
    and whose tensors their storages back (module doc); `UserError` naming the file."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        refuse_legacy_format(path)
        raise UserError(f"{path}: not a torch.save zip archive")
    try:
        with zipfile.ZipFile(path) as archive:
            obj = _meta_object(path, archive)
    except UserError:
        raise
    except (zipfile.BadZipFile, OSError, pickle.UnpicklingError, EOFError, TypeError,
            ValueError, KeyError, IndexError, RuntimeError, RecursionError) as error:
        raise UserError(f"{path}: not a readable torch.save file ({_first_line(error)})"
                        ) from None
    tensors: dict[str, torch.Tensor] = {}
    _collect(obj, "", tensors)
    check_tensors_backed(path, tensors)


def _meta_object(path: Path, archive: zipfile.ZipFile) -> Any:
    """The archive's object, every storage a meta tensor whose record was checked."""
    size = path.stat().st_size
    members = {info.filename: info for info in archive.infolist()}
    for info in members.values():
        check_member(path, info, size)
    pickles = [n for n in members if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
        raise UserError(f"{path}: not a torch.save archive (no data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]

    def storage(ref: StorageRef) -> torch.Tensor:
        name = f"{prefix}data/{ref.key}"
        info = members.get(name)
        if info is None:
            raise UserError(f"{path}: storage {ref.key} has no record {name} in the archive")
        if not isinstance(ref.numel, int) or isinstance(ref.numel, bool) or ref.numel < 0:
            raise UserError(f"{path}: storage {ref.key} declares {ref.numel!r} elements")
        needed = ref.numel * torch.empty((), dtype=ref.dtype).element_size()
        if info.file_size < needed:
            raise UserError(f"{path}: record {name} holds {info.file_size:,} bytes, but its "
                            f"storage declares {ref.numel:,} elements ({needed:,} bytes): the "
                            "record is cut short, and reading it would take its neighbours' "
                            "bytes; refusing to read it")
        return torch.empty(ref.numel, dtype=ref.dtype, device="meta")

    data = read_checked_pickle(io.BytesIO(archive.read(members[pickles[0]])))
    return TorchArchiveUnpickler(data, storage).load()


def _collect(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor in nested mappings and sequences, by dotted name."""
    if isinstance(value, torch.Tensor):
        tensors[prefix or "(the file's object)"] = value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _collect(item, f"{prefix}.{key}" if prefix else str(key), tensors)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _collect(item, f"{prefix}[{index}]", tensors)
