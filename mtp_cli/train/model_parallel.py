"""Training with tensor, pipeline and context parallel, and data parallel around them.

Each rank builds only its pipeline stages from the stage plan (global layer numbers; weights
initialised from `train.seed` and their global names, so every layout starts from the
single-process weights), then applies tensor parallel and context parallel from outside. A step:

1. micro-batches through the pipeline schedule (or straight through the single stage);
2. sequence-parallel gradient sums, then embedding-copy gradient sums over the embedding group;
3. gradients summed over data x context ranks (context ranks hold different tokens of the same
   sequences; each micro-batch's loss is already normalised by its context-global token count),
   then averaged over data ranks (or divided by the step's tokens in per-token mode);
4. clipping with every logical parameter counted once (TP shards summed, copies skipped,
   stages summed), and the optimizer step (dropped when the loss or the norm is non-finite).

Data parallel is an explicit coalesced all-reduce (DDP cannot drive a model whose stages run
under a hand-written schedule), or with `parallel.fsdp` FSDP2 over the data x context ranks with
TP inside, as torchtitan composes them: each stage's layers and the stage itself are
`fully_shard`ed over the 1-D data x context mesh, the backward reduce-scatters gradients, and
parameters, gradients and Adam moments stay sharded, in checkpoints too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.fsdp import FSDPModule

from mtp_cli.build.model_builder import build_model, loss_settings_for
from mtp_cli.config.schema import RunSpec
from mtp_cli.models.gpt import GPTModel
from mtp_cli.mtp.autoscaler import MTPLossAutoScaler
from mtp_cli.mtp.logging_helper import MTPLossLoggingHelper
from mtp_cli.mtp.run_state import MTPRunState
from mtp_cli.parallel.context_parallel import apply_context_parallel
from mtp_cli.parallel.data_parallel import shard_fully
from mtp_cli.parallel.mesh import ParallelMesh
from mtp_cli.parallel.pipeline_p2p import TorchP2P
from mtp_cli.parallel.pipeline_position import PipelinePosition
from mtp_cli.parallel.pipeline_schedule import PipelineSchedule
from mtp_cli.parallel.recompute import apply_activation_checkpointing
from mtp_cli.parallel.sharded_state import held
from mtp_cli.parallel.tensor_parallel import parallelize_tensor
from mtp_cli.parallel.tied_embeddings import allreduce_embedding_grads
from mtp_cli.parallel.tp_grads import grad_square_sum, sync_sequence_parallel_grads
from mtp_cli.plan.placement import build_stage_plan
from mtp_cli.plan.stages import StagePlan
from mtp_cli.train.model_parallel_state import (
    EmbeddingGroup,
    is_copy,
    load_placeholders,
    load_sharded_state,
    sharded_model_state,
    sharded_optimizer_state,
)
from mtp_cli.train.nonfinite import update_is_finite
from mtp_cli.train.optim import build_optimizer
from mtp_cli.train.step import StepOutput, StepSettings


def _group_if_parallel(group: dist.ProcessGroup, size: int) -> dist.ProcessGroup | None:
    return group if size > 1 else None


def build_embedding_group(plan: StagePlan, spec: RunSpec, mesh: ParallelMesh
                          ) -> EmbeddingGroup | None:
    """One group per (data, context, tensor) coordinate of the pipeline ranks holding the
    embedding or a copy of it; every rank takes part in creating all of them."""
    tied = spec.model.share_embeddings_and_output_weights
    holders = sorted({entry.pp_rank for entry in plan.stages
                      if entry.embedding or entry.mtp_layers or (entry.loss and tied)})
    ranks = mesh.mesh.mesh  # global ranks, shape (pp, dp, cp, tp)
    me = dist.get_rank()
    mine: EmbeddingGroup | None = None
    for coordinate in torch.cartesian_prod(*[torch.arange(n) for n in ranks.shape[1:]]) \
            .reshape(-1, 3).tolist():
        members = [int(ranks[(p, *coordinate)]) for p in holders]
        group = dist.new_group(members) if len(members) > 1 else None
        if me in members:
            mine = EmbeddingGroup(group=group, src=members[0])
    return mine


class ModelParallelEngine:
    """This rank's pipeline stages under tensor / context parallel; see the module docstring."""

    def __init__(self, spec: RunSpec, mesh: ParallelMesh, settings: StepSettings, *,
                 allow_imports: bool = False) -> None:
        self.spec, self.mesh, self.settings = spec, mesh, settings
        dims = mesh.dims
        self.depths = spec.mtp.num_layers
        self.plan = build_stage_plan(spec)
        self.tp_group = _group_if_parallel(mesh.group("tp"), dims.tp)
        self.pp_group = _group_if_parallel(mesh.group("pp"), dims.pp)
        self.cp_group = _group_if_parallel(mesh.group("cp"), dims.cp)
        self.dp_cp_group = _group_if_parallel(mesh.dp_cp_group, dims.dp_cp)
        self.loss_settings, self.mtp_state = loss_settings_for(spec), MTPRunState()
        self.chunks = [self._build_chunk(vp, allow_imports) for vp in self._virtual_stages()]
        self.embedding = build_embedding_group(self.plan, spec, mesh)
        self.optimizer = build_optimizer(nn.ModuleList(self.chunks), spec.train)
        self.schedule = self._schedule() if dims.pp > 1 else None

    # --- construction --------------------------------------------------------------------------
    def _virtual_stages(self) -> list[int | None]:
        virtual = self.plan.virtual_pipeline
        return list(range(virtual)) if virtual else [None]

    def _build_chunk(self, vp_stage: int | None, allow_imports: bool) -> GPTModel:
        pp_rank = self.mesh.mesh.get_local_rank("pp")
        contents = self.plan.stage(pp_rank, vp_stage)
        chunk = build_model(self.spec, self.settings.device, stage=contents,
                            allow_imports=allow_imports)
        if self.tp_group is not None:
            parallelize_tensor(chunk, self.tp_group,
                               sequence_parallel=self.spec.parallel.sequence_parallel)
        if self.cp_group is not None:
            apply_context_parallel(chunk, self.cp_group)
        chunk.groups = self.mesh.model_groups()
        chunk.loss_settings, chunk.mtp_state = self.loss_settings, self.mtp_state
        apply_activation_checkpointing(chunk, self.spec.train.recompute)
        if self.spec.parallel.fsdp:  # after TP and recompute, as torchtitan orders them
            shard_fully(chunk, self.mesh.dp_cp_mesh)
        return chunk

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

    # --- one step ------------------------------------------------------------------------------
    def _cp_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.cp_group is not None:
            dist.all_reduce(value, group=self.cp_group)
        return value

    def _run(self, batches: list[Any], totals: torch.Tensor, *, train: bool) -> None:
        """Forward (and backward when training) every micro-batch; add up the main loss."""
        per_token, count = self.settings.per_token_loss, len(batches)

        def loss_fn(per_token_loss: torch.Tensor, batch: Any) -> torch.Tensor:
            mask = batch.loss_mask.float()
            loss_sum = (per_token_loss.float() * mask).sum()
            tokens = mask.sum()
            totals.add_(torch.stack([loss_sum.detach(), tokens]).double())
            if per_token:
                return loss_sum
            return loss_sum / self._cp_sum(tokens.clone()).clamp(min=1) / count

        batches = [b.to(self.settings.device) for b in batches]
        MTPLossLoggingHelper.ensure_tracker(self.depths, self.settings.device, self.pp_group,
                                            self.dp_cp_group)
        with self.settings.autocast():
            if self.schedule is not None and train:
                self.schedule.step(batches, loss_fn, self.settings.device)
            elif self.schedule is not None:
                self.schedule.forward_only(batches, loss_fn, self.settings.device)
            else:
                for batch in batches:
                    per_token_loss = self.chunks[0](
                        batch.input_ids, batch.position_ids, labels=batch.labels,
                        loss_mask=batch.loss_mask, packed_seq_params=batch.packed_seq_params)
                    loss = loss_fn(per_token_loss, batch)
                    if train:
                        loss.backward()

    def _reduce_totals(self, totals: torch.Tensor) -> torch.Tensor:
        """(loss sum, tokens) of the global batch, on every rank (the loss stage computed it)."""
        for group in (self.pp_group, self.dp_cp_group):
            if group is not None:
                dist.all_reduce(totals, group=group)
        return totals

    def _reduce_gradients(self, tokens: float) -> None:
        """Sum over data x context ranks, then average over data ranks (or per token).

        Under FSDP2 the backward already reduce-scattered each gradient as an average over
        data x context ranks: only the scale is left (x cp, or x dp_cp / tokens).
        """
        dims = self.mesh.dims
        if self.spec.parallel.fsdp:
            scale = dims.dp_cp / max(tokens, 1.0) if self.settings.per_token_loss else \
                float(dims.cp)
            grads = [held(p.grad) for chunk in self.chunks for p in chunk.parameters()
                     if p.grad is not None]
            if grads and scale != 1.0:
                torch._foreach_mul_(grads, scale)
            return
        params = [p for chunk in self.chunks for p in chunk.parameters()]
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        grads = [p.grad for p in params]
        scale = 1.0 / max(tokens, 1.0) if self.settings.per_token_loss else \
            1.0 / self.mesh.dims.dp
        flat = _flatten_dense_tensors(grads)
        if self.dp_cp_group is not None:
            dist.all_reduce(flat, group=self.dp_cp_group)
        flat.mul_(scale)
        for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(reduced)

    def _clip(self) -> float:
        """Clip to `train.grad_clip` (0 = off); returns the norm before clipping."""
        square = torch.zeros((), dtype=torch.float32, device=self.settings.device)
        # FSDP2: each data x context rank holds rows of every gradient
        shards = [self.mesh.dp_cp_group] if self.spec.parallel.fsdp and self.mesh.dims.dp_cp > 1 \
            else []
        for chunk in self.chunks:
            square = square + grad_square_sum(chunk, self.tp_group, sum_groups=shards,
                                              skip=lambda name, c=chunk: is_copy(c, name))
        if self.pp_group is not None:
            dist.all_reduce(square, group=self.pp_group)
        norm = square.sqrt()
        if self.settings.grad_clip > 0:
            coefficient = (self.settings.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            grads = [held(p.grad) for chunk in self.chunks for p in chunk.parameters()
                     if p.grad is not None]
            torch._foreach_mul_(grads, coefficient)
        return float(norm)

    def train_step(self, batches: list[Any]) -> StepOutput:
        with self.mtp_state.activate():
            return self._train_step(batches)

    def _train_step(self, batches: list[Any]) -> StepOutput:
        count = len(batches)
        MTPLossAutoScaler.set_loss_scale(1.0 if self.settings.per_token_loss else 1.0 / count)
        totals = torch.zeros(2, dtype=torch.float64, device=self.settings.device)
        self._run(batches, totals, train=True)
        totals = self._reduce_totals(totals)
        for chunk in self.chunks:
            sync_sequence_parallel_grads(chunk)
        allreduce_embedding_grads(self.chunks, self.embedding.group if self.embedding else None)
        self._reduce_gradients(float(totals[1]))
        grad_norm = self._clip()
        lm_loss = float(totals[0] / totals[1].clamp(min=1))
        applied = update_is_finite(lm_loss, grad_norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(lm_loss=lm_loss, loss_tokens=int(totals[1]), grad_norm=grad_norm,
                          applied=applied)

    def evaluate(self, loader: Any, num_batches: int) -> dict[str, float]:
        with self.mtp_state.activate():
            return self._evaluate(loader, num_batches)

    @torch.no_grad()
    def _evaluate(self, loader: Any, num_batches: int) -> dict[str, float]:
        for chunk in self.chunks:
            chunk.eval()
            chunk.track_mtp_in_eval = True
        try:
            totals = torch.zeros(2, dtype=torch.float64, device=self.settings.device)
            self._run([loader.next_batch() for _ in range(num_batches)], totals, train=False)
            totals = self._reduce_totals(totals)
        finally:
            for chunk in self.chunks:
                chunk.train()
                chunk.track_mtp_in_eval = False
        result = {"val_lm_loss": float(totals[0] / totals[1].clamp(min=1))}
        if self.depths:
            MTPLossLoggingHelper.reduce_loss_in_tracker()
            values = MTPLossLoggingHelper.tracker["values"].double().cpu()
            result.update({f"val_mtp_{k + 1}_loss": float(values[k])
                           for k in range(self.depths)})
            MTPLossLoggingHelper.clean_loss_in_tracker()
        return result

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
