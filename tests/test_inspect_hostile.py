"""`mtp inspect-ckpt` on files that declare more than they hold: huge DCP shapes, chunks outside
their tensor, pickles with giant counted lengths, stride-0 views of one storage, compressed or
legacy-format archives. Each is refused (exit 2, the file named) before anything of the declared
size is allocated: the CLI runs under an address-space limit."""

from __future__ import annotations

import argparse
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

from mtp_cli.checkpoint import read_metadata
from mtp_cli.errors import UserError
from mtp_cli.inspect import inspect_checkpoint
from tests.ckpt_helpers import tiny_spec, write_dcp_checkpoint
from tests.hostile_helpers import assert_refused, run_bounded

EMBEDDING = "model.embedding.word_embeddings.weight"
HUGE = 10**7  # a [HUGE, HUGE] float32 tensor: 400 TB
GIANT_COUNT = b"\x80\x04\x8e" + struct.pack("<Q", 2**40) + b"abc"  # BINBYTES8 of 1 TiB
STRIDE_0 = "tensor w declares [1000000000, 1000000000] (1e+18 elements, strides [0, 0]) over " \
           "a storage of 31,108 bytes"


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("good") / "run"
    write_dcp_checkpoint(run, tiny_spec(mtp={"num_layers": 1}))
    return run


@pytest.fixture
def ckpt(good_run, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(good_run, target)
    return target / "checkpoints" / "step_0000010"


def edit_metadata(ckpt: Path, edit) -> None:
    metadata = read_metadata(ckpt)
    edit(metadata.state_dict_metadata)
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))


def refused_in_process(path: Path, needle: str) -> str:
    with pytest.raises(UserError) as caught:
        inspect_checkpoint(path)
    assert needle in str(caught.value), str(caught.value)
    return str(caught.value)


# --- DCP -------------------------------------------------------------------------------------
def _declare_huge(entries) -> None:
    entry = entries[EMBEDDING]
    entry.size = torch.Size([HUGE, HUGE])
    entry.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([HUGE, HUGE]))]


def _chunk_outside(entries) -> None:
    entries[EMBEDDING].chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([128, 16]))]


def _chunks_short(entries) -> None:
    entries[EMBEDDING].size = torch.Size([HUGE, 32])


@pytest.mark.parametrize(("edit", "needle"), [
    (_declare_huge, f"for a chunk of {EMBEDDING} of shape ({HUGE}, {HUGE}), fewer than its "
                    "elements need"),
    (_chunk_outside, "a chunk at [0, 0] of [128, 16] lies outside its declared size [64, 32]"),
    (_chunks_short, "its chunks hold 2,048 elements, its declared size [10000000, 32] has"),
])
def test_dcp_declared_sizes_checked_against_the_shards(ckpt, edit, needle):
    edit_metadata(ckpt, edit)
    text = refused_in_process(ckpt, needle)
    assert f"{ckpt / '.metadata'}: tensor {EMBEDDING}" in text or \
        f"{ckpt / '__0_0.distcp'}: holds" in text


@pytest.mark.slow
def test_dcp_huge_shape_refused_by_the_cli_in_bounded_memory(ckpt):
    edit_metadata(ckpt, _declare_huge)
    outcome = run_bounded("inspect-ckpt", str(ckpt), "--strict")
    assert_refused(outcome, str(ckpt / "__0_0.distcp"), "fewer than its elements need")


def test_metadata_with_a_giant_counted_length(ckpt):
    """BINBYTES8 declaring 2^40 bytes in a 20-byte file: the unpickler would allocate them."""
    (ckpt / ".metadata").write_bytes(GIANT_COUNT)
    refused_in_process(ckpt, "DCP metadata does not parse (malformed pickle")


@pytest.mark.slow
def test_metadata_with_a_giant_counted_length_through_the_cli(ckpt):
    (ckpt / ".metadata").write_bytes(GIANT_COUNT)
    outcome = run_bounded("inspect-ckpt", str(ckpt))
    assert_refused(outcome, str(ckpt / ".metadata"), "malformed pickle")


# --- torch.save ------------------------------------------------------------------------------
def _binint(value: int) -> bytes:
    return b"J" + struct.pack("<i", value) if value < 2**31 else \
        b"\x8a\x08" + struct.pack("<q", value)


def crafted_archive(path: Path, *, shape=None, stride=None, megatron=False,
                    compress_storage=False) -> Path:
    """A real torch.save of {'w': ones(7777, 1)} whose data.pkl declares another shape/strides
    (the archive rewritten around it); `megatron` adds an args Namespace, so weights_only
    loading refuses the file and the restricted reader takes over."""
    state: dict = {"w": torch.ones(7777, 1)}
    if megatron:
        state["args"] = argparse.Namespace(lr=0.1)
    base = path.with_suffix(".base")
    torch.save(state, base)
    with zipfile.ZipFile(base) as source:
        members = [(info, source.read(info)) for info in source.infolist()]
    base.unlink()
    with zipfile.ZipFile(path, "w") as target:
        for info, data in members:
            if info.filename.endswith("data.pkl"):
                if shape is not None:
                    data = data.replace(b"M\x61\x1eK\x01\x86",
                                        _binint(shape[0]) + _binint(shape[1]) + b"\x86", 1)
                if stride is not None:
                    data = data.replace(b"K\x01K\x01\x86q\t",
                                        _binint(stride[0]) + _binint(stride[1]) + b"\x86q\t", 1)
            method = zipfile.ZIP_DEFLATED if compress_storage and "/data/" in info.filename \
                else zipfile.ZIP_STORED
            target.writestr(info.filename, data, compress_type=method)
    return path


@pytest.mark.parametrize("megatron", [False, True], ids=["weights_only", "restricted_reader"])
def test_stride_zero_view_of_one_storage_is_refused(tmp_path, megatron):
    path = crafted_archive(tmp_path / "w.pt", shape=(10**9, 10**9), stride=(0, 0),
                           megatron=megatron)
    refused_in_process(path, STRIDE_0)


@pytest.mark.slow
@pytest.mark.parametrize("megatron", [False, True], ids=["weights_only", "restricted_reader"])
def test_stride_zero_view_through_the_cli(tmp_path, megatron):
    path = crafted_archive(tmp_path / "w.pt", shape=(10**9, 10**9), stride=(0, 0),
                           megatron=megatron)
    assert_refused(run_bounded("inspect-ckpt", str(path)), STRIDE_0)


@pytest.mark.parametrize("megatron", [False, True], ids=["weights_only", "restricted_reader"])
def test_shape_past_its_storage_is_refused(tmp_path, megatron):
    path = crafted_archive(tmp_path / "w.pt", shape=(10**9, 10**9), stride=(10**9, 1),
                           megatron=megatron)
    refused_in_process(path, f"{path}: tensor w declares [1000000000, 1000000000]")


def test_compressed_member_is_refused_unread(tmp_path):
    """torch.save stores members uncompressed; a deflated one could expand without bound."""
    path = crafted_archive(tmp_path / "w.pt", compress_storage=True)
    refused_in_process(path, "archive member w/data/0 declares 31,108 bytes that the file does "
                             "not hold as stored data")


def test_legacy_format_is_refused(tmp_path):
    """The pre-1.6 loader allocates each storage at its declared size before reading it."""
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    refused_in_process(path, "pre-1.6 legacy format, which is not read")


def test_a_genuine_file_still_reads(tmp_path):
    path = crafted_archive(tmp_path / "w.pt")
    report = inspect_checkpoint(path)
    assert report.checkpoint.tensors["w"].shape == (7777, 1)
