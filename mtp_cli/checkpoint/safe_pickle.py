"""Unpicklers that never run code a file names: only our own allow-listed constructors.

A checkpoint is data, but pickle is a program. `mtp train` resumes from, and `inspect-ckpt`
reads, files of unknown origin, so every global a pickle asks for is looked up in an allow list
here and nowhere else:

- DCP's `.metadata` may only build the classes of `torch.distributed.checkpoint.metadata` and a
  few plain values (dtypes, `torch.Size`, paths); anything else is refused (`UnsafePickleError`).
- A `torch.save` archive (`TorchArchiveUnpickler`) rebuilds tensors with our own functions from
  the raw storage bytes; any other global becomes an inert `Unreadable` placeholder (counted,
  later skipped), so a Megatron `_extra_state` buffer or an `argparse.Namespace` costs nothing.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import pickletools
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allow list."""


class Unreadable:
    """Stands in for an object of a class we refuse to import; records only its name."""

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Unreadable:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<unreadable {self.global_name}>"


def _placeholder_class(module: str, name: str) -> type[Unreadable]:
    return type("Unreadable", (Unreadable,), {"global_name": f"{module}.{name}"})


DTYPES: dict[str, torch.dtype] = {
    name: value for name in dir(torch) if isinstance(value := getattr(torch, name), torch.dtype)
}
# Legacy typed-storage class names that `torch.save` writes, and the dtype each one holds.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "ByteStorage": torch.uint8, "CharStorage": torch.int8,
    "ShortStorage": torch.int16, "IntStorage": torch.int32, "LongStorage": torch.int64,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}


def _rebuild_layout(name: str) -> torch.layout:
    if name != "torch.strided":
        raise UnsafePickleError(f"unexpected tensor layout {name!r}")
    return torch.strided


def _common_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {("torch", n): d for n, d in DTYPES.items()}
    allowed[("torch", "Size")] = torch.Size
    allowed[("collections", "OrderedDict")] = OrderedDict
    allowed[("torch.serialization", "_get_layout")] = _rebuild_layout
    return allowed


def _dcp_metadata_globals() -> dict[tuple[str, str], Any]:
    allowed = _common_globals()
    module = dcp_metadata.__name__
    for name in dir(dcp_metadata):
        value = getattr(dcp_metadata, name)
        if isinstance(value, type) and value.__module__ == module:
            allowed[(module, name)] = value
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = _StorageInfo
    for path_class in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"):
        allowed[("pathlib", path_class)] = pathlib.PurePosixPath
    return allowed


class DCPMetadataUnpickler(pickle.Unpickler):
    """Reads DCP's `.metadata`; refuses any global that is not DCP metadata or a plain value."""

    _allowed = _dcp_metadata_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load {module}.{name} (not a DCP metadata class)") from None


MAX_PICKLE_BYTES = 2**31  # a .metadata or data.pkl is structure only: MBs for huge models


def read_checked_pickle(stream: io.BufferedIOBase) -> io.BytesIO:
    """The pickle's bytes, after checking that every length it declares fits in them.

    The C unpickler allocates a counted bytes/str object (`BINBYTES8 2**40`) at its declared
    size before reading it, so a few crafted bytes could ask for a terabyte. `pickletools`
    walks the opcodes reading from memory instead, and refuses a count past the end.
    """
    data = stream.read(MAX_PICKLE_BYTES + 1)
    if len(data) > MAX_PICKLE_BYTES:
        raise pickle.UnpicklingError(f"larger than {MAX_PICKLE_BYTES:,} bytes")
    try:
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
    except ValueError as error:
        raise pickle.UnpicklingError(f"malformed pickle ({error})") from None
    return io.BytesIO(data)


def load_dcp_metadata(stream: io.BufferedIOBase) -> dcp_metadata.Metadata:
    """The `Metadata` object of a DCP checkpoint, built only from allow-listed classes."""
    metadata = DCPMetadataUnpickler(read_checked_pickle(stream)).load()
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class StorageRef:
    """A storage named by a `torch.save` archive: its dtype and where its bytes are."""

    def __init__(self, dtype: torch.dtype | None, key: str, numel: int) -> None:
        self.dtype, self.key, self.numel = dtype, key, numel


class _StorageType:
    """What a typed-storage global (`torch.FloatStorage`) resolves to: just its dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class TorchArchiveUnpickler(pickle.Unpickler):
    """Unpickles a `torch.save` zip archive's `data.pkl` without importing anything it names.

    Tensors are rebuilt by `read_storage(ref) -> 1-D tensor` (bytes read from the archive);
    every other global becomes an `Unreadable` placeholder and is counted in `unreadable`.
    """

    def __init__(self, stream: io.BufferedIOBase,
                 read_storage: Callable[[StorageRef], torch.Tensor]) -> None:
        super().__init__(stream)
        self._read_storage = read_storage
        self._storages: dict[str, torch.Tensor] = {}
        self.unreadable: list[str] = []
        self._allowed = _common_globals()
        self._allowed.update({
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
            ("torch._tensor", "_rebuild_from_type_v2"): self._rebuild_from_type,
            ("torch", "Tensor"): torch.Tensor,
            ("torch.nn.parameter", "Parameter"): torch.Tensor,
        })
        for name, dtype in STORAGE_DTYPES.items():
            self._allowed[("torch", name)] = _StorageType(dtype)

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is not None:
            return found
        self.unreadable.append(f"{module}.{name}")
        return _placeholder_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            return _placeholder_class("storage", str(storage_type))()
        key = str(key)
        if key not in self._storages:
            self._storages[key] = self._read_storage(StorageRef(storage_type.dtype, key, numel))
        return self._storages[key]

    @staticmethod
    def _rebuild_tensor(storage: Any, storage_offset: int, size: Any, stride: Any,
                        *_ignored: Any) -> Any:
        if not isinstance(storage, torch.Tensor):
            return storage  # an Unreadable storage stays unreadable
        return storage.as_strided(tuple(size), tuple(stride), int(storage_offset))

    @staticmethod
    def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
        return data

    @staticmethod
    def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
        if new_type is not torch.Tensor:
            return _placeholder_class("tensor subclass", str(new_type))()
        return func(*args)
