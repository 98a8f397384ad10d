"""Checkpoints with torch.distributed.checkpoint (DCP), written so that a crash never leaves a
half-written checkpoint where a resume would take it.

Every rank writes its shards into `checkpoints/step_NNNNNNN.tmp-<random>/`; rank 0 then writes
`meta.json` (last), renames the directory into place and replaces the `latest` marker
atomically (`mtp_cli.checkpoint.meta` and `.publish`). A checkpoint is complete exactly when its
final name exists with a meta.json, and `latest` only ever names such a one.

Every read goes through `mtp_cli.checkpoint` (the allow-list unpickler for `.metadata`, the file
named when a shard does not load); a save on a full disk removes its temporary directory and
stops with `DiskFull`, leaving `latest` where it was.

The DCP state dict (keys fixed by CONTRACTS.md): `model` and `optimizer` as the engine offers
them - each rank's own shards under the canonical names and global shapes, never gathered
(`train/model_parallel_state.py`), the optimizer flattened per parameter as
`torch.distributed.checkpoint.state_dict` flattens it - then `scheduler`, `trainer`
(step, tokens, cumulative MTP acceptance counts) and the per-rank `rng.rank{r}` and
`data.rank{r}` (DCP keeps one value per key, so anything that differs by rank is keyed by rank).
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mtp_cli import __version__
from mtp_cli.checkpoint.checksums import directory_checksums
from mtp_cli.checkpoint.dcp_files import load_state, read_metadata
from mtp_cli.checkpoint.disk_full import save_state
from mtp_cli.checkpoint.files import CheckpointFileError
from mtp_cli.checkpoint.layout import checkpoint_name
from mtp_cli.checkpoint.meta import CheckpointMeta, created_now, write_meta
from mtp_cli.checkpoint.publish import publish_directory, temp_sibling
from mtp_cli.checkpoint.run_dir import RunDir
from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import Problem, UserError
from mtp_cli.mtp.logging_helper import MTPLossLoggingHelper
from mtp_cli.plan.dims import ParallelDims
from mtp_cli.train.engine import Engine
from mtp_cli.train.faults import NO_FAULTS, FaultPoints
from mtp_cli.train.nonfinite import finite_json
from mtp_cli.train.optim import load_scheduler_state, scheduler_state
from mtp_cli.train.stops import disk_full


@dataclass
class TrainState:
    """Where training stands: optimizer steps done and training tokens seen."""

    step: int = 0
    tokens: int = 0


@dataclass
class Stateful:
    """What a checkpoint saves and restores besides the step counter."""

    engine: Engine  # the model (parts) and optimizer as trained
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: Any  # MicroBatchLoader: state_dict() / load_state_dict()


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random states: torch (CPU), the current CUDA device, Python's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Checkpointer:
    """Saves and loads checkpoints of one run directory (every rank calls every method)."""

    def __init__(self, run_dir: RunDir, spec: RunSpec, dims: ParallelDims, *, rank: int,
                 device: torch.device, faults: FaultPoints = NO_FAULTS) -> None:
        self.run_dir, self.spec, self.dims = run_dir, spec, dims
        self.rank, self.device, self.faults = rank, device, faults

    # --- the state dict ------------------------------------------------------------------------
    def _state_dict(self, parts: Stateful, train_state: TrainState, *,
                    for_loading: bool = False) -> dict[str, Any]:
        engine = parts.engine
        model_sd, optim_sd = engine.load_placeholders() if for_loading else engine.state_dicts()
        depths = engine.depths
        cumulative = MTPLossLoggingHelper.state_dict()
        trainer: dict[str, Any] = {"step": train_state.step, "tokens": train_state.tokens}
        if depths:
            zeros = torch.zeros(depths, dtype=torch.float64)
            trainer["mtp_correct"] = cumulative.get("correct", zeros).double().clone()
            trainer["mtp_total"] = cumulative.get("total", zeros).double().clone()
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": scheduler_state(parts.scheduler),
            "trainer": trainer,
            f"rng.rank{self.rank}": rng_state(self.device),
            f"data.rank{self.rank}": dict(parts.loader.state_dict()),
        }

    # --- save ----------------------------------------------------------------------------------
    def save(self, parts: Stateful, train_state: TrainState, losses: dict[str, float]) -> Path:
        """Write checkpoint `step_NNNNNNN` of `train_state.step`; returns its final path."""
        step, rank = train_state.step, self.rank
        name = checkpoint_name(step)
        temp = self.run_dir.checkpoints / self._temp_name(name)
        final = self.run_dir.checkpoints / name
        state = self._state_dict(parts, train_state)
        try:
            save_state(state, temp, before_write=lambda: self.faults.disk_full(step, rank))
            self.faults.fail_during_checkpoint(step, rank)
            if rank == 0:
                self._write_meta(temp, train_state, losses)
                self._publish(temp, final)
                self.run_dir.prune(self.spec.checkpoint.keep_last)
        except BaseException as error:  # DCP's CheckpointException is a BaseException
            stop = disk_full(error, f"writing checkpoint {name}")
            if stop is None:
                raise
            if rank == 0:
                shutil.rmtree(temp, ignore_errors=True)
            raise stop from None
        dist.barrier()
        return final

    def _temp_name(self, name: str) -> str:
        """A fresh temporary directory name, chosen by rank 0 for everyone."""
        box = [temp_sibling(Path(name)).name if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return str(box[0])

    def _write_meta(self, directory: Path, train_state: TrainState,
                    losses: dict[str, float]) -> None:
        cumulative = MTPLossLoggingHelper.state_dict()
        losses, nonfinite = finite_json(losses)  # JSON has no NaN: null, and say so
        write_meta(directory, CheckpointMeta(
            step=train_state.step,
            tokens=train_state.tokens,
            spec=self.spec.model_dump(mode="json"),
            losses=losses,
            world_size=self.dims.world_size,
            parallel=self.dims.as_dict(),
            mtp_cumulative={
                "correct": [int(v) for v in cumulative.get("correct", torch.zeros(0)).tolist()],
                "total": [int(v) for v in cumulative.get("total", torch.zeros(0)).tolist()],
            },
            created=created_now(),
            mtp_cli_version=__version__,
            nonfinite=nonfinite,
            checksums=directory_checksums(directory) if self.spec.checkpoint.checksums else None,
        ))

    def _publish(self, temp: Path, final: Path) -> None:
        """Rename the finished directory into place (the same step written again, when a run
        is extended past its end, replaces it), then point `latest` at it."""
        publish_directory(temp, final)
        self.run_dir.point_latest(final.name)

    # --- load ----------------------------------------------------------------------------------
    def load(self, path: Path, parts: Stateful) -> TrainState:
        """Restore everything from checkpoint directory `path`; returns the step and tokens.

        The checkpoint may come from another number of processes: DCP reshards the model and
        optimizer, the data position is converted by the loader (every rank drew as many
        micro-batches, so rank 0's position serves a rank the checkpoint did not have), and a
        rank without a saved RNG state keeps its freshly seeded one.
        """
        stored = read_metadata(path).state_dict_metadata
        state = self._state_dict(parts, TrainState(), for_loading=True)
        rng_key, data_key = f"rng.rank{self.rank}", f"data.rank{self.rank}"
        if not _has(stored, rng_key):
            del state[rng_key]
        if not _has(stored, data_key):
            state["data.rank0"] = state.pop(data_key)
            data_key = "data.rank0"
        for key in [k for k in state[data_key] if not _has(stored, f"{data_key}.{k}")]:
            del state[data_key][key]  # the data fingerprint: none in older checkpoints, imports
        _drop_unstored(state, stored, path)
        load_state(state, path)
        try:
            parts.engine.load_state_dicts(state["model"], state["optimizer"])
            load_scheduler_state(parts.scheduler, state["scheduler"])
            if rng_key in state:
                set_rng_state(state[rng_key], self.device)
            parts.loader.load_state_dict({k: int(v) for k, v in state[data_key].items()})
            trainer = state["trainer"]
            if "mtp_correct" in trainer:
                MTPLossLoggingHelper.load_state_dict(
                    {"correct": trainer["mtp_correct"], "total": trainer["mtp_total"]})
            return TrainState(step=int(trainer["step"]), tokens=int(trainer["tokens"]))
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointFileError(path, f"holds a value this run cannot use ({error})"
                                      ) from None


def _drop_unstored(state: dict[str, Any], stored: dict[str, Any], path: Path) -> None:
    """Optimizer entries the checkpoint lacks (parameters that never had a gradient) stay
    unloaded; a model weight the checkpoint lacks is an error."""
    missing = [k for k in state["model"] if not _has(stored, f"model.{k}")]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6
                                          else "")
        raise UserError(problems=[Problem(f"the checkpoint lacks model weights: {shown}",
                                          file=str(path), hint="--overwrite starts afresh")])
    for key in [k for k in state["optimizer"] if not _has(stored, f"optimizer.{k}")]:
        del state["optimizer"][key]


def _has(stored: dict[str, Any], prefix: str) -> bool:
    """Whether the checkpoint holds an entry under `prefix` (DCP flattens nested dicts)."""
    return any(key == prefix or key.startswith(prefix + ".") for key in stored)

