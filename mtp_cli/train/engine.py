"""Training engines: what a step, a validation pass and a checkpoint do for a parallel layout.

`DataParallelEngine` trains one whole model per rank under DDP or FSDP2 (data parallel only).
`ModelParallelEngine` (`mtp_cli.train.model_parallel`) trains pipeline stages with tensor and
context parallel. Both store checkpoints in one format - the model's canonical names, and the
optimizer state flattened per parameter (`state.<name>.exp_avg`, `param_groups.<name>.lr`) -
so a checkpoint written by either loads into the other at any layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from mtp_cli.build.model_builder import build_model, loss_settings_for
from mtp_cli.config.schema import RunSpec
from mtp_cli.models.gpt import GPTModel
from mtp_cli.mtp.loss import LossSettings
from mtp_cli.mtp.run_state import MTPRunState
from mtp_cli.parallel.data_parallel import apply_data_parallel, unwrap_model
from mtp_cli.parallel.mesh import ParallelMesh
from mtp_cli.parallel.recompute import apply_activation_checkpointing
from mtp_cli.train.optim import build_optimizer
from mtp_cli.train.step import StepOutput, StepSettings, evaluate, train_step

STATE_DICT_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class Engine(Protocol):
    """What the trainer drives."""

    chunks: list[GPTModel]  # this rank's model parts (one, or its pipeline stages)
    optimizer: torch.optim.Optimizer
    loss_settings: LossSettings  # the run's, shared by every chunk (λ is updated here)
    mtp_state: MTPRunState  # the run's MTP tracker and loss scale, shared by every chunk

    def train_step(self, batches: list[Any]) -> StepOutput: ...
    def evaluate(self, loader: Any, num_batches: int) -> dict[str, float]: ...
    def state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]: ...
    def load_placeholders(self) -> tuple[dict[str, Any], dict[str, Any]]: ...
    def load_state_dicts(self, model_sd: dict[str, Any], optim_sd: dict[str, Any]) -> None: ...


def set_mtp_loss_scaling_factor(engine: Engine, value: float) -> None:
    """λ for the coming steps, in the run's loss settings (every chunk reads them)."""
    engine.loss_settings.mtp_loss_scaling_factor = float(value)


def attach_run(chunk: GPTModel, loss_settings: LossSettings, mtp_state: MTPRunState) -> None:
    """Give a model chunk the run's loss settings and MTP state (shared by all chunks)."""
    chunk.loss_settings = loss_settings
    chunk.mtp_state = mtp_state


class DataParallelEngine:
    """A whole model per rank; DDP or FSDP2 over the data x context group."""

    def __init__(self, spec: RunSpec, mesh: ParallelMesh, settings: StepSettings, *,
                 allow_imports: bool = False) -> None:
        self.spec, self.settings = spec, settings
        self.loss_settings, self.mtp_state = loss_settings_for(spec), MTPRunState()
        gpt = build_model(spec, settings.device, allow_imports=allow_imports)
        gpt.groups = mesh.model_groups()
        attach_run(gpt, self.loss_settings, self.mtp_state)
        if spec.parallel.expert > 1:  # before DDP: it must skip the expert parameters
            from mtp_cli.parallel.expert_parallel import setup_expert_parallel

            self.settings = dataclasses.replace(settings, expert_grads=setup_expert_parallel(
                gpt, mesh.dims, spec.parallel.expert))
        apply_activation_checkpointing(gpt, spec.train.recompute)
        self.chunks = [gpt]
        self.model = apply_data_parallel(gpt, mesh, fsdp=spec.parallel.fsdp,
                                         device=settings.device)
        self.optimizer = build_optimizer(self.model, spec.train)

    def train_step(self, batches: list[Any]) -> StepOutput:
        with self.mtp_state.activate():
            return train_step(self.model, self.optimizer, batches, self.settings)

    def evaluate(self, loader: Any, num_batches: int) -> dict[str, float]:
        model = unwrap_model(self.model)
        gpt = self.chunks[0]
        gpt.track_mtp_in_eval = True
        model.eval()
        try:
            with self.mtp_state.activate():
                return evaluate(model, loader, num_batches, self.settings,
                                self.spec.mtp.num_layers)
        finally:
            model.train()
            gpt.track_mtp_in_eval = False

    def state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return get_state_dict(self.model, self.optimizer, options=STATE_DICT_OPTIONS)

    def load_placeholders(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """What DCP loads into: the current state, whose tensors have the stored shapes."""
        return self.state_dicts()

    def load_state_dicts(self, model_sd: dict[str, Any], optim_sd: dict[str, Any]) -> None:
        if not optim_sd:  # a checkpoint with no optimizer state yet (`mtp import`, step 0)
            set_model_state_dict(self.model, model_sd, options=STATE_DICT_OPTIONS)
            return
        set_state_dict(self.model, self.optimizer, model_state_dict=model_sd,
                       optim_state_dict=optim_sd, options=STATE_DICT_OPTIONS)


def build_engine(spec: RunSpec, mesh: ParallelMesh, settings: StepSettings, *,
                 allow_imports: bool = False) -> Engine:
    """The engine for `spec`'s layout: model parallel when tensor, pipeline or context > 1."""
    dims = mesh.dims
    if dims.tp > 1 or dims.pp > 1 or dims.cp > 1:
        from mtp_cli.train.model_parallel import ModelParallelEngine

        return ModelParallelEngine(spec, mesh, settings, allow_imports=allow_imports)
    return DataParallelEngine(spec, mesh, settings, allow_imports=allow_imports)
