"""A step-0 checkpoint in exactly the format `mtp train` writes, written one tensor at a time.

`mtp train` resumes from `checkpoints/latest` -> `step_0000000/`: DCP entries `model.<name>`
(one tensor per logical weight, canonical names), `scheduler` at its first step, `trainer`
(step 0, no tokens, zero MTP acceptance counts), the data position `data.rank0` at the first
micro-batch, and `meta.json` (the resolved spec, layout, losses). No optimizer state exists yet
(the trainer loads only what is stored), and no RNG state (every rank keeps its fresh seed).

DCP plans a save from the state dict's shapes alone, so the model's entries are meta-device
placeholders; `LazySavePlanner.resolve_data` produces each tensor when the writer reaches it.
DCP's writer keeps every tensor of a file until the file is complete, so `BoundedFileWriter`
cuts the rank's items, in order, into files of at most `file_bytes` (`__0_0.distcp`,
`__0_1.distcp`, ...; DCP's metadata names each item's file): memory holds one file's tensors.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from mtp_cli import __version__
from mtp_cli.checkpoint.checksums import directory_checksums
from mtp_cli.checkpoint.meta import CheckpointMeta, created_now, write_meta
from mtp_cli.checkpoint.run_dir import RunDir, checkpoint_name
from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import UserError
from mtp_cli.hf.memory import release_freed_memory
from mtp_cli.plan.run_plan import mtp_depths

MODEL_KEY = "model."
Producer = Callable[[], torch.Tensor]


class LazySavePlanner(DefaultSavePlanner):
    """Produces `model.*` tensors on demand (checked against their planned shape and dtype)."""

    def __init__(self, producers: dict[str, Producer], trim_every: int) -> None:
        super().__init__()
        self.producers, self.trim_every, self.produced = producers, trim_every, 0

    def resolve_data(self, write_item: Any) -> Any:
        fqn = write_item.index.fqn
        producer = self.producers.get(fqn)
        if producer is None:
            return super().resolve_data(write_item)
        if self.produced >= self.trim_every:  # a file's worth written and released
            release_freed_memory()
            self.produced = 0
        tensor = producer()
        self.produced += tensor.numel() * tensor.element_size()
        planned = write_item.tensor_data
        if tuple(tensor.shape) != tuple(planned.size) or \
                tensor.dtype != planned.properties.dtype:
            raise RuntimeError(f"{fqn}: produced {tuple(tensor.shape)} {tensor.dtype}, planned "
                               f"{tuple(planned.size)} {planned.properties.dtype}")
        return tensor.contiguous()


def _item_bytes(item: Any) -> int:
    if item.tensor_data is None:
        return 0
    return math.prod(item.tensor_data.size) * item.tensor_data.properties.dtype.itemsize


class BoundedFileWriter(dcp.FileSystemWriter):
    """`FileSystemWriter` whose files hold consecutive items of at most `file_bytes` (one item
    larger than that gets a file of its own), written one file after another."""

    def __init__(self, path: Path, file_bytes: int) -> None:
        super().__init__(path, single_file_per_rank=True, thread_count=1)
        self.file_bytes = file_bytes

    def write_data(self, plan: Any, planner: Any) -> Any:
        if not hasattr(self, "_write_data"):  # a DCP without the hook: one file per item
            self.single_file_per_rank = False
            return super().write_data(plan, planner)
        buckets: list[list[Any]] = [[]]
        size = 0
        for item in plan.items:
            nbytes = _item_bytes(item)
            if buckets[-1] and size + nbytes > self.file_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(item)
            size += nbytes
        files: queue.Queue = queue.Queue()
        for index, bucket in enumerate(buckets):
            name = f"{plan.storage_data.prefix}{index}.distcp"
            files.put((self.fs.concat_path(self.path, name), name, bucket))
        return self._write_data(planner, files)


def training_state(spec: RunSpec) -> dict[str, Any]:
    """What a fresh `mtp train` at step 0 would save besides the model and optimizer."""
    train, depths = spec.train, mtp_depths(spec)
    trainer: dict[str, Any] = {"step": 0, "tokens": 0}
    if depths:
        trainer["mtp_correct"] = torch.zeros(depths, dtype=torch.float64)
        trainer["mtp_total"] = torch.zeros(depths, dtype=torch.float64)
    data = {"micro_batches": 0, "epoch": 0, "position": 0,
            "micro_batch_size": train.micro_batch_size, "dp_size": 1,
            "global_batch_size": train.global_batch_size}
    return {"scheduler": {"last_epoch": 0}, "trainer": trainer, "data.rank0": data}


def step0_meta(spec: RunSpec, extra: dict[str, Any]) -> CheckpointMeta:
    """The meta record of a step-0 checkpoint (what `Checkpointer` records, plus `extra`)."""
    depths = mtp_depths(spec)
    return CheckpointMeta(
        step=0, tokens=0, spec=spec.model_dump(mode="json"), losses={}, world_size=1,
        parallel={"data": 1, "tensor": 1, "pipeline": 1, "context": 1},
        mtp_cumulative={"correct": [0] * depths, "total": [0] * depths},
        created=created_now(), mtp_cli_version=__version__, extra=dict(extra))


def write_step0_checkpoint(run_dir: Path, spec: RunSpec,
                           tensors: dict[str, tuple[tuple[int, ...], torch.dtype, Producer]],
                           extra_meta: dict[str, Any], *, file_bytes: int = 2**30) -> Path:
    """`run_dir/checkpoints/step_0000000` from `{name: (shape, dtype, producer)}` in DCP files
    of at most `file_bytes`, then `latest`; returns the checkpoint directory. `run_dir` is
    itself a staging directory (published whole by `mtp import`); `meta.json` and `latest` are
    written atomically all the same, as `mtp train` writes them."""
    run = RunDir(run_dir)
    directory = run.checkpoints / checkpoint_name(0)
    directory.mkdir(parents=True)
    placeholders = {name: torch.empty(shape, dtype=dtype, device="meta")
                    for name, (shape, dtype, _) in tensors.items()}
    producers = {MODEL_KEY + name: producer for name, (_, _, producer) in tensors.items()}
    state = {"model": placeholders, **training_state(spec)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no_dist: "assuming the intent is ... single process"
        try:
            dcp.save(state, storage_writer=BoundedFileWriter(directory, file_bytes),
                     planner=LazySavePlanner(producers, trim_every=file_bytes), no_dist=True)
        except CheckpointException as error:  # a producer refused its tensor (a NaN weight)
            causes = [f[0] if isinstance(f, tuple) else f for f in error.failures.values()]
            refusal = next((c for c in causes if isinstance(c, UserError)), None)
            if refusal is None:
                raise
            raise refusal from None
    meta = step0_meta(spec, extra_meta)
    if spec.checkpoint.checksums:  # as `mtp train` records them, verified on resume
        meta = dataclasses.replace(meta, checksums=directory_checksums(directory))
    write_meta(directory, meta)
    run.point_latest(directory.name)
    return directory
