"""The training engine: one for every layout (data parallel with DDP or FSDP2, tensor, pipeline,
virtual pipeline and context parallel, and their products).

Each rank builds only its pipeline stages from the stage plan (one stage, the whole model, without
pipeline parallel), with parameters on the meta device; tensor parallel reshapes them, and only
this rank's shards are allocated, initialised from `train.seed` and their global names, one full
tensor at a time (`mtp_cli.parallel.meta_init`), so every layout starts from the single-process
weights; under expert parallel the other ranks' experts are dropped before that, never
allocated. Then it applies context parallel, activation recomputation and data parallel from
outside. Data parallel is DDP for a whole model per rank, FSDP2 over the data x context ranks
with `parallel.fsdp` (TP inside, as torchtitan composes them; under expert parallel each MoE
layer's routed experts over the expert-data-parallel ranks instead), and otherwise one coalesced
all-reduce after the backward (DDP cannot drive stages run under a hand-written schedule).

A step, the validation pass and the clipping are `mtp_cli.train.step`'s (`StepRunner`,
`clip_gradients`): one code path. Checkpoints hold each rank's own shards under the canonical
single-process names and global shapes (`mtp_cli.train.model_parallel_state`), the optimizer
state flattened per parameter (`state.<name>.exp_avg`, `param_groups.<name>.lr`), so a checkpoint
written at any layout loads at any other.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from mtp_cli.builders.model_builder import build_model, loss_settings_for
from mtp_cli.config.schema import RunSpec
from mtp_cli.gpt import GPTModel
from mtp_cli.mtp.loss import LossSettings
from mtp_cli.mtp.run_state import MTPRunState
from mtp_cli.parallel.compile import apply_compile
from mtp_cli.parallel.context_parallel import apply_context_parallel
from mtp_cli.parallel.data_parallel import apply_data_parallel, shard_fully
from mtp_cli.parallel.expert_parallel import (
    ExpertGradients,
    apply_expert_parallel,
    shard_experts,
)
from mtp_cli.parallel.mesh import ParallelMesh
from mtp_cli.parallel.meta_init import materialize, parameters_on_meta
from mtp_cli.parallel.pipeline_p2p import TorchP2P
from mtp_cli.parallel.pipeline_position import PipelinePosition
from mtp_cli.parallel.pipeline_schedule import PipelineSchedule
from mtp_cli.parallel.recompute import apply_activation_checkpointing
from mtp_cli.parallel.tensor_parallel import parallelize_tensor
from mtp_cli.plan.placement import build_stage_plan
from mtp_cli.plan.stages import StagePlan
from mtp_cli.train.model_parallel import build_embedding_group
from mtp_cli.train.model_parallel_state import (
    is_copy,
    load_placeholders,
    load_sharded_state,
    sharded_model_state,
    sharded_optimizer_state,
)
from mtp_cli.train.optim import build_optimizer
from mtp_cli.train.step import (
    GradientHook,
    StepLayout,
    StepOutput,
    StepRunner,
    StepSettings,
)


class Engine(Protocol):
    """What the trainer drives."""

    chunks: list[GPTModel]  # this rank's model parts (one, or its pipeline stages)
    optimizer: torch.optim.Optimizer
    loss_settings: LossSettings  # the run's, shared by every chunk (λ is updated here)
    mtp_state: MTPRunState  # the run's MTP tracker and loss scale, shared by every chunk

    def train_step(self, batches: list[Any], *, before_norm: GradientHook | None = None
                   ) -> StepOutput: ...
    def evaluate(self, loader: Any, num_batches: int) -> dict[str, float]: ...
    def state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]: ...
    def load_placeholders(self) -> tuple[dict[str, Any], dict[str, Any]]: ...
    def load_state_dicts(self, model_sd: dict[str, Any], optim_sd: dict[str, Any]) -> None: ...


def set_mtp_loss_scaling_factor(engine: Engine, value: float) -> None:
    """λ for the coming steps, in the run's loss settings (every chunk reads them)."""
    engine.loss_settings.mtp_loss_scaling_factor = float(value)


def set_mtp_depth_weights(engine: Engine, weights: tuple[float, ...] | None) -> None:
    """`mtp.depth_weights` in force for the coming steps (None: every depth 1)."""
    engine.loss_settings.mtp_depth_weights = weights


def set_hsm_step(engine: Engine, seed: int, dp_rank: int, step: int) -> None:
    """Key the coming step's hidden-state mixing draws (mtp.hsm) by seed, rank and step."""
    engine.mtp_state.hsm_key = (seed, dp_rank, step)
    engine.mtp_state.hsm_draws = 0


def attach_run(chunk: GPTModel, loss_settings: LossSettings, mtp_state: MTPRunState) -> None:
    """Give a model chunk the run's loss settings and MTP state (shared by all chunks)."""
    chunk.loss_settings = loss_settings
    chunk.mtp_state = mtp_state


def _group_if_parallel(group: dist.ProcessGroup, size: int) -> dist.ProcessGroup | None:
    return group if size > 1 else None


class TrainingEngine:
    """This rank's model parts under its layout; see the module docstring."""

    def __init__(self, spec: RunSpec, mesh: ParallelMesh, settings: StepSettings, *,
                 allow_imports: bool = False, plan: StagePlan | None = None) -> None:
        self.spec, self.mesh, self.settings = spec, mesh, settings
        dims = mesh.dims
        self.plan = plan or build_stage_plan(spec)
        self.depths = self.plan.mtp_depths
        self.tp_group = _group_if_parallel(mesh.group("tp"), dims.tp)
        self.pp_group = _group_if_parallel(mesh.group("pp"), dims.pp)
        self.cp_group = _group_if_parallel(mesh.group("cp"), dims.cp)
        self.dp_cp_group = _group_if_parallel(mesh.dp_cp_group, dims.dp_cp)
        self.loss_settings, self.mtp_state = loss_settings_for(spec), MTPRunState()
        # expert parallel: the groups first, so each stage keeps only this rank's experts
        # while still on the meta device; then their gradients' reduction
        ep = spec.parallel.expert
        self.expert_groups = mesh.expert_groups(ep) if ep > 1 else None
        self.expert_mesh = (mesh.expert_data_mesh(ep)
                            if ep > 1 and spec.parallel.fsdp else None)
        self.chunks = [self._build_chunk(vp, allow_imports) for vp in self._virtual_stages()]
        etp_group = self.tp_group if spec.parallel.expert_tensor > 1 else None
        self.expert_grads = (ExpertGradients(nn.ModuleList(self.chunks), self.expert_groups,
                                             sharded=self.expert_mesh is not None,
                                             tp_group=etp_group)
                             if self.expert_groups is not None else None)
        self.embedding = build_embedding_group(self.plan, spec, mesh)
        modules, grad_sync = self._data_parallel()
        self.optimizer = build_optimizer(nn.ModuleList(self.chunks), spec.train)
        layout = StepLayout(
            tp_group=self.tp_group, pp_group=self.pp_group, cp_group=self.cp_group,
            dp_cp_group=self.dp_cp_group,
            embedding_group=self.embedding.group if self.embedding else None,
            dp=dims.dp, cp=dims.cp, grad_sync=grad_sync, skip=is_copy,
            experts=self.expert_grads)
        self.runner = StepRunner(self.chunks, self.optimizer, settings, layout,
                                 depths=self.depths, modules=modules,
                                 schedule=self._schedule() if dims.pp > 1 else None)

    # --- construction --------------------------------------------------------------------------
    def _virtual_stages(self) -> list[int | None]:
        virtual = self.plan.virtual_pipeline
        return list(range(virtual)) if virtual else [None]

    def _build_chunk(self, vp_stage: int | None, allow_imports: bool) -> GPTModel:
        pp_rank = self.mesh.mesh.get_local_rank("pp")
        contents = self.plan.stage(pp_rank, vp_stage)
        with parameters_on_meta():  # buffers real, parameters meta: nothing full-size kept
            chunk = build_model(self.spec, self.settings.device, stage=contents,
                                allow_imports=allow_imports, initialize=False)
        if self.expert_groups is not None:  # other ranks' experts dropped while still meta
            apply_expert_parallel(chunk, self.expert_groups)
        plan = None
        if self.tp_group is not None:
            plan = parallelize_tensor(chunk, self.tp_group,
                                      sequence_parallel=self.spec.parallel.sequence_parallel,
                                      expert_tensor=self.spec.parallel.expert_tensor > 1)
        # this rank's shards only, initialised by global name: the single-process weights
        materialize(chunk, self.spec, self.settings.device,
                    shard_fn=plan.shard_like_parameter if plan is not None else None,
                    full_shapes=plan.full_shapes(chunk) if plan is not None else None)
        if self.cp_group is not None:
            apply_context_parallel(chunk, self.cp_group)
        chunk.groups = self.mesh.model_groups(
            sequence_parallel=self.spec.parallel.sequence_parallel)
        attach_run(chunk, self.loss_settings, self.mtp_state)
        apply_activation_checkpointing(chunk, self.spec.train.recompute)
        apply_compile(chunk, self.spec.train.compile)  # per layer, after recompute, before DP
        if self.spec.parallel.fsdp:  # after TP and recompute, as torchtitan orders them
            if self.expert_mesh is not None:  # routed experts over their own replicas first
                shard_experts(chunk, self.expert_mesh)
            shard_fully(chunk, self.mesh.dp_cp_mesh)
        return chunk

    def _data_parallel(self) -> tuple[list[nn.Module], str]:
        """What to call for a forward, and how gradients are synchronised: FSDP2 (sharded at
        construction), DDP around a whole model per rank, or the step's all-reduce (also under
        expert parallel, whose experts the step reduces over their own group)."""
        dims = self.mesh.dims
        if self.spec.parallel.fsdp:
            return self.chunks, "fsdp"
        if dims.dp_cp > 1 and dims.tp == dims.pp == dims.cp == 1 and self.expert_grads is None:
            ddp = apply_data_parallel(self.chunks[0], self.mesh, fsdp=False,
                                      device=self.settings.device)
            return [ddp], "ddp"
        return self.chunks, "allreduce"

    def _schedule(self) -> PipelineSchedule:
        dims, model = self.mesh.dims, self.spec.model
        seq = model.seq_length // dims.cp
        if self.spec.parallel.sequence_parallel:
            seq //= dims.tp
        position = PipelinePosition(
            self.plan, self.mesh.mesh.get_local_rank("pp"),
            hidden_shape=(seq, self.spec.train.micro_batch_size, model.hidden_size))
        return PipelineSchedule(
            self.chunks, position, TorchP2P(self.pp_group),
            microbatch_group_size=self.spec.parallel.microbatch_group_size_per_vp_stage)

    # --- a step and validation -----------------------------------------------------------------
    def train_step(self, batches: list[Any], *, before_norm: GradientHook | None = None
                   ) -> StepOutput:
        with self.mtp_state.activate():
            return self.runner.train_step(batches, before_norm=before_norm)

    def evaluate(self, loader: Any, num_batches: int) -> dict[str, float]:
        with self.mtp_state.activate():
            return self.runner.evaluate([loader.next_batch() for _ in range(num_batches)])

    # --- checkpoints ---------------------------------------------------------------------------
    def _resharded(self) -> None:
        """FSDP2 keeps the root's parameters gathered after a forward without backward (a
        validation pass): shard them again so checkpoints see, and fill, the sharded ones."""
        for chunk in self.chunks:
            for module in chunk.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    def state_dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        self._resharded()
        return (sharded_model_state(self.chunks, self.embedding, self.dp_cp_group),
                sharded_optimizer_state(self.chunks, self.optimizer))

    def load_placeholders(self) -> tuple[dict[str, Any], dict[str, Any]]:
        self._resharded()
        return load_placeholders(self.chunks, self.optimizer)

    def load_state_dicts(self, model_sd: dict[str, Any], optim_sd: dict[str, Any]) -> None:
        load_sharded_state(self.chunks, self.optimizer, model_sd, optim_sd)


def build_engine(spec: RunSpec, mesh: ParallelMesh, settings: StepSettings, *,
                 allow_imports: bool = False, plan: StagePlan | None = None) -> Engine:
    """The engine for `spec`'s layout (one class for every layout); `plan`: the spec's stage
    plan when the caller holds it (`RunPlan.stages`)."""
    return TrainingEngine(spec, mesh, settings, allow_imports=allow_imports, plan=plan)
