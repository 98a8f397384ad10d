"""Tensor-parallel checkpoints hold each rank's own shards, never a gathered copy.

The DCP metadata of a TP run's checkpoint must list, for every tensor-parallel-sharded parameter
and each of its Adam moments, chunks that tile the canonical global shape without overlap or
gap, none of them full-size, each written by the rank that holds those rows or columns (DCP's
write balancing would hide a gather behind a spread of file sizes: the chunk list does not). The
checkpoint still resumes at another tensor-parallel size with the continuing run's losses.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from mtp_cli.checkpoint.sharded_state import attach_state_sharders, local_tensor, sharded_tensor
from mtp_cli.parallel.fsdp_local import fsdp_rows
from mtp_cli.parallel.tp_sharding import COLUMN, GATED_COLUMN, ROW
from tests.ckpt_helpers import tiles
from tests.dist_utils import run_distributed
from tests.tp_cases import make_spec, reference_and_parallel
from tests.train_helpers import corpus, metrics, run_train  # noqa: F401

KEYS = ("lm_loss", "mtp_1_loss", "mtp_2_loss")
# the names tensor parallel splits (weights; biases of column-parallel linears too)
SHARDED = ("linear_qkv.", "linear_proj.weight", "linear_fc1.", "linear_fc2.weight",
           "eh_proj.", "word_embeddings.weight", "output_layer.weight")
BASE = ["model.add_bias_linear=false", "model.num_query_groups=4", "train.adam_eps=1e-6", "train.steps=3",
        "checkpoint.interval=3", "train.eval_interval=100"]


# --- no processes -----------------------------------------------------------------------------
@pytest.mark.parametrize("rule", [COLUMN, GATED_COLUMN, ROW], ids=["column", "gated", "row"])
@pytest.mark.parametrize("size", [2, 4])
def test_each_rank_offers_its_blocks_and_the_blocks_tile_the_tensor(rule, size):
    full = torch.arange(16.0 * 8).view(16, 8)
    boxes = []
    for rank in range(size):
        local = rule.shard(full, rank, size)
        value = sharded_tensor(local, rule, rank, size)
        assert tuple(value.size()) == (16, 8)
        shards = value.local_shards()
        assert len(shards) == rule.parts  # SwiGLU's fc1: gate_r and up_r apart
        for shard in shards:
            offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            region = full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))]
            assert torch.equal(shard.tensor, region)  # the global rows it claims
            assert shard.tensor.data_ptr() >= local.data_ptr()  # a view, no copy
            boxes.append((offsets, sizes))
        assert torch.equal(local_tensor(value, rule), local)
    assert tiles(boxes, [16, 8])


@pytest.mark.parametrize("rule", [None, COLUMN, GATED_COLUMN, ROW],
                         ids=["replicated", "column", "gated", "row"])
@pytest.mark.parametrize("dp", [2, 3])
def test_fsdp_rows_of_tp_shards_tile_the_tensor(rule, dp):
    """FSDP2 keeps rows of each TP-local tensor (unevenly at dp=3, across SwiGLU's gate/up
    boundary): the pieces every (TP, FSDP) rank offers are its own rows and tile the tensor."""
    full = torch.arange(16.0 * 8).view(16, 8)
    tp = 1 if rule is None else 2
    boxes = []
    for t in range(tp):
        local = full if rule is None else rule.shard(full, t, tp)
        for d in range(dp):
            start, end = fsdp_rows(local.shape[0], d, dp)
            rows = local[start:end]  # what FSDP2's DTensor.to_local() holds
            value = sharded_tensor(rows, rule, t, tp, tp_shape=local.shape, dp_rank=d,
                                   dp_size=dp)
            for shard in value.local_shards():
                offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                region = full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes,
                                                                     strict=True))]
                assert torch.equal(shard.tensor, region)
                boxes.append((offsets, sizes))
            assert local_tensor(value) is rows
    assert tiles(boxes, [16, 8])


def test_gated_shards_sit_at_gate_and_up_offsets():
    full = torch.arange(16.0)[:, None]  # F = 8: rows 0-7 gate, 8-15 up; TP4: k = 2
    value = sharded_tensor(GATED_COLUMN.shard(full, 1, 4), GATED_COLUMN, 1, 4)
    assert [s.metadata.shard_offsets[0] for s in value.local_shards()] == [2, 10]


# --- sharded_state_dict() of a TP2 model ------------------------------------------------------
def _mtp_state_worker(rank: int, world_size: int, directory: str) -> None:
    spec = make_spec("llama", 2, False)
    reference, parallel, _plan = reference_and_parallel(spec, dist.group.WORLD, False)
    attach_state_sharders(parallel)
    state = parallel.mtp.sharded_state_dict(prefix="mtp.")
    fc1 = "mtp.layers.0.transformer_layer.mlp.linear_fc1.weight"
    assert len(state[fc1].local_shards()) == 2
    assert tuple(state[fc1].size()) == tuple(reference.state_dict()[fc1].shape)
    layer = parallel.mtp.layers["1"].sharded_state_dict(prefix="mtp.layers.1.")
    assert layer.keys() == {k for k in state if k.startswith("mtp.layers.1.")}
    dcp.save(state, checkpoint_id=directory)
    expected = {k: v.clone() for k, v in parallel.mtp.state_dict().items()}
    with torch.no_grad():
        for param in parallel.mtp.parameters():
            param.zero_()
    dcp.load(parallel.mtp.sharded_state_dict(prefix="mtp."), checkpoint_id=directory)
    for name, value in parallel.mtp.state_dict().items():  # loaded straight into the params
        assert torch.equal(value, expected[name]), name


@pytest.mark.distributed
def test_mtp_block_sharded_state_dict_round_trips_through_dcp(tmp_path):
    """Saved from TP2 as local shards, loaded back into the TP2 block and, without a process
    group, into the single-process block: the same weights."""
    directory = str(tmp_path / "mtp_state")
    run_distributed(_mtp_state_worker, 2, directory)
    stored = FileSystemReader(directory).read_metadata().state_dict_metadata
    fc1 = stored["mtp.layers.0.transformer_layer.mlp.linear_fc1.weight"]
    assert len(fc1.chunks) == 4  # [gate_0, up_0, gate_1, up_1]
    from mtp_cli import build_model

    reference = build_model(make_spec("llama", 2, False))
    target = {f"mtp.{k}": torch.zeros_like(v) for k, v in reference.mtp.state_dict().items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(target, checkpoint_id=directory, no_dist=True)
    for name, value in reference.mtp.state_dict().items():
        assert torch.equal(target[f"mtp.{name}"], value), name


# --- checkpoints of real runs ------------------------------------------------------------------
def _owner(chunk_offsets: list[int], chunk_sizes: list[int], shape: list[int], size: int,
           name: str) -> int:
    """The TP rank whose local tensor holds this chunk (gate/up blocks for SwiGLU's fc1)."""
    dim = next(d for d in range(len(shape)) if chunk_sizes[d] != shape[d])
    parts = 2 if "linear_fc1" in name else 1
    return (chunk_offsets[dim] % (shape[dim] // parts)) // chunk_sizes[dim]


def assert_sharded_checkpoint(checkpoint: Path, tp: int) -> int:
    """Every TP-sharded parameter and moment: chunks tile, none full, written by its owner.
    Returns how many tensors were checked."""
    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    checked = 0
    for key, entry in metadata.state_dict_metadata.items():
        name = key.removeprefix("model.").removeprefix("optimizer.state.")
        name = name.removesuffix(".exp_avg_sq").removesuffix(".exp_avg")
        if not isinstance(entry, TensorStorageMetadata) or not any(s in name for s in SHARDED):
            continue
        if not (key.startswith("model.") or key.endswith((".exp_avg", ".exp_avg_sq"))):
            continue
        shape = list(entry.size)
        boxes = [(list(c.offsets), list(c.sizes)) for c in entry.chunks]
        parts = 2 if "linear_fc1" in name else 1
        assert len(boxes) == tp * parts, (key, boxes)
        assert all(sizes != shape for _, sizes in boxes), key
        assert tiles(boxes, shape), key
        for index, stored in metadata.storage_data.items():
            if index.fqn != key:
                continue
            offsets = list(index.offset)
            sizes = next(s for o, s in boxes if o == offsets)
            owner = _owner(offsets, sizes, shape, tp, name)
            assert stored.relative_path.startswith(f"__{owner}_"), (key, offsets, stored)
        checked += 1
    return checked





@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory, corpus):  # noqa: F811
    """A TP2 run to step 3, then one more step continued at TP2 and resumed at TP4 (the TP4
    run writes the TP4 checkpoint the metadata test reads)."""
    root = tmp_path_factory.mktemp("sharded")
    first = root / "tp2"
    result = run_train(first, corpus, *BASE, "parallel.tensor=2", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {"tp2": first}
    for name, nproc in (("tp2", 2), ("tp4", 4)):
        run_dir = root / f"resume_{name}"
        shutil.copytree(first, run_dir)
        result = run_train(run_dir, corpus, *BASE, "train.steps=4", "checkpoint.interval=1",
                           f"parallel.tensor={name[2:]}",
                           nproc=nproc)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "resumed from step_0000003" in result.stdout + result.stderr
        runs[f"resume_{name}"] = run_dir
    return runs


@pytest.mark.slow
@pytest.mark.distributed
def test_tp2_checkpoint_stores_each_ranks_shards(tp_runs):
    checked = assert_sharded_checkpoint(tp_runs["tp2"] / "checkpoints" / "step_0000003", 2)
    # (2 decoder + 2 MTP layers) x 4 linears, 2 eh_proj, embedding, output layer; x3 (moments)
    assert checked == (4 * 4 + 2 + 2) * 3


@pytest.mark.slow
@pytest.mark.distributed
def test_tp4_checkpoint_stores_each_ranks_shards(tp_runs):
    checked = assert_sharded_checkpoint(tp_runs["resume_tp4"] / "checkpoints" / "step_0000004",
                                        4)
    assert checked == (4 * 4 + 2 + 2) * 3


@pytest.mark.slow
@pytest.mark.distributed
def test_tp2_checkpoint_resumes_at_tp4_with_the_same_losses(tp_runs):
    ours = metrics(tp_runs["resume_tp4"])[0][-1]
    theirs = metrics(tp_runs["resume_tp2"])[0][-1]
    assert ours["step"] == theirs["step"] == 4
    for key in KEYS:
        assert abs(ours[key] - theirs[key]) <= 1e-5, (key, ours[key], theirs[key])
