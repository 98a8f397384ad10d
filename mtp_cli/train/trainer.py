"""The training loop of one worker process: build, resume, step, log, validate, checkpoint.

Every rank runs the same loop (collectives inside); global rank 0 alone writes metrics, shows
progress and publishes checkpoints.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch
import torch.distributed as dist

from mtp_cli.checkpoint.run_dir import RunDir, truncate_metrics
from mtp_cli.config.schema import RunSpec
from mtp_cli.data import MicroBatchLoader, build_datasets
from mtp_cli.data.datasets import data_fingerprint
from mtp_cli.mtp.logging_helper import MTPLossLoggingHelper
from mtp_cli.parallel.mesh import DistEnv, build_mesh
from mtp_cli.plan.dims import ParallelDims
from mtp_cli.plan.run_plan import RunPlan
from mtp_cli.train.checkpoint import Checkpointer, Stateful, TrainState
from mtp_cli.train.engine import (
    build_engine,
    set_hsm_step,
    set_mtp_depth_weights,
    set_mtp_loss_scaling_factor,
)
from mtp_cli.train.faults import NO_FAULTS, FaultPoints
from mtp_cli.train.flop_rate import FlopRate
from mtp_cli.train.metrics import IntervalMetrics, MetricsWriter, peak_memory_mb
from mtp_cli.train.moe_metrics import MoEStepMetrics
from mtp_cli.train.nonfinite import NonFiniteGuard
from mtp_cli.train.optim import build_scheduler
from mtp_cli.train.progress import ProgressReporter
from mtp_cli.train.resume import choose_checkpoint
from mtp_cli.train.step import StepOutput, StepSettings
from mtp_cli.train.stops import stop_on_disk_full


def seed_everything(seed: int) -> None:
    """Seed the global generators (dropout, Python's random) the same on every data-parallel
    rank, as Megatron does; parameters have their own per-name generators."""
    random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Trains `spec` in `run_dir` on this process's share of the job; `faults` are the test
    fault points (none by default)."""

    def __init__(self, spec: RunSpec, run_dir: RunDir, env: DistEnv, *,
                 allow_imports: bool = False, faults: FaultPoints = NO_FAULTS) -> None:
        self.spec, self.run_dir, self.env, self.faults = spec, run_dir, env, faults
        seed_everything(spec.train.seed)
        self.plan = RunPlan.of(spec, env.world_size)
        assert self.plan.dims is not None
        self.dims: ParallelDims = self.plan.dims
        self.mesh = build_mesh(self.dims, env.device.type)
        self.train_set, self.val_set = build_datasets(spec)
        self.loader = self._loader(self.train_set, shuffle=True)
        # a blend's weights and shares, on the run's first metrics line (a dict: `mtp report`
        # reads numbers only)
        self.data_note = self.train_set.record(spec.train.steps * spec.train.global_batch_size
                                               ) if spec.data.blend is not None else None
        self.num_microbatches = self.dims.num_microbatches(spec)
        self.settings = StepSettings.for_run(spec, self.dims, self.mesh, env.device)
        self.engine = build_engine(spec, self.mesh, self.settings, allow_imports=allow_imports,
                                   plan=self.plan.stages)
        self.optimizer = self.engine.optimizer
        self.scheduler = build_scheduler(self.optimizer, spec.train)
        self.parts = Stateful(self.engine, self.scheduler, self.loader)
        self.checkpointer = Checkpointer(run_dir, spec, self.dims, rank=env.rank,
                                         device=env.device, faults=faults)
        self.tokens_per_step = spec.train.global_batch_size * spec.model.seq_length
        self.flop_rate = FlopRate.for_run(spec, env.device, env.world_size)
        self.depths = self.plan.depths
        self.state = TrainState()
        self.is_main = env.rank == 0
        self.writer: MetricsWriter | None = None
        self.progress: ProgressReporter | None = None
        # what the last step used and logged (for its metrics line and the checkpoint)
        self.lr = spec.train.lr
        self.mtp_loss_scale = spec.mtp.loss_scale_at(0)
        self.mtp_metrics: dict[str, float] = {}
        self.guard = NonFiniteGuard(spec.train.nonfinite, spec.train.nonfinite_max_skips)
        sequence_parallel = spec.parallel.sequence_parallel
        self.moe_metrics = MoEStepMetrics(
            self.plan, device=env.device,
            pp_group=self.mesh.group("pp") if self.dims.pp > 1 else None,
            dp_cp_group=self.mesh.dp_cp_group if self.dims.dp_cp > 1 else None,
            tp_cp_group=self.mesh.token_split_group(sequence_parallel=sequence_parallel),
            tp_group=self.mesh.group("tp") if sequence_parallel and self.dims.tp > 1 else None)

    def _loader(self, dataset: Any, *, shuffle: bool) -> MicroBatchLoader:
        """This rank's stream; validation reads its windows in order, from the start each time."""
        train = self.spec.train
        return MicroBatchLoader(
            dataset, micro_batch_size=train.micro_batch_size, dp_rank=self.mesh.dp_rank,
            dp_size=self.dims.dp, seed=train.seed, packed=self.spec.data.packed,
            cp_rank=self.mesh.cp_rank, cp_size=self.dims.cp,
            global_batch_size=train.global_batch_size, shuffle=shuffle,
            pad_to_multiple=self.spec.data.pad_documents_to,
            data_fingerprint=data_fingerprint(self.spec) if shuffle else 0,
            allow_data_change=self.spec.data.allow_data_change,
        )

    # --- the whole run -------------------------------------------------------------------------
    def run(self) -> None:
        """The run, with the engine's MTP state current (tracker, cumulative acceptance in
        checkpoints, loss scale: what `MTPLossLoggingHelper`'s class-level calls act on)."""
        with self.engine.mtp_state.activate():
            self._run()

    def _run(self) -> None:
        train = self.spec.train
        with stop_on_disk_full("starting the run"):
            self._resume()
            if self.is_main:
                self.writer = MetricsWriter(self.spec, self.run_dir.metrics, self.run_dir.tb,
                                            resume_step=self.state.step,
                                            run_name=self.run_dir.root.name, warn=print)
                self.progress = ProgressReporter(train.steps, self.state.step, self.depths)
        try:
            with stop_on_disk_full("writing metrics"):
                self._loop()
        finally:
            if self.progress is not None:
                self.progress.close()
            if self.writer is not None:
                self.writer.close()

    def _resume(self) -> None:
        path = choose_checkpoint(self.run_dir, is_main=self.is_main)
        if path is not None:
            self.state = self.checkpointer.load(path, self.parts)
            if self.is_main:
                print(f"resumed from {path.name} (step {self.state.step})", flush=True)
        if self.is_main:
            self.faults.disk_full_at_start(self.env.rank)
            truncate_metrics(self.run_dir.metrics, self.state.step)
        dist.barrier()

    def _loop(self) -> None:
        """Step; log every log_interval; validate and checkpoint on their intervals and after
        the last step (validation first, so the final checkpoint follows every line)."""
        train, checkpoint = self.spec.train, self.spec.checkpoint
        totals = IntervalMetrics()
        while self.state.step < train.steps:
            output = self._step(totals)
            step = self.state.step
            last = step == train.steps
            if step % train.log_interval == 0 or last:
                self._log(totals, output)
                totals = IntervalMetrics()
            self.faults.kill_rank(step, self.env.rank)
            if train.eval_interval and (step % train.eval_interval == 0 or last):
                self._validate()
            if last or (checkpoint.interval and step % checkpoint.interval == 0):
                self._save(output)
            self.faults.hang(step)
        if self.progress is not None:
            self.progress.note(f"finished: step {self.state.step}, {self.state.tokens} tokens; "
                               f"run directory {self.run_dir.root}")

    # --- one step ------------------------------------------------------------------------------
    def _step(self, totals: IntervalMetrics) -> StepOutput:
        started = time.perf_counter()
        self.mtp_loss_scale = self.spec.mtp.loss_scale_at(self.state.tokens)
        set_mtp_loss_scaling_factor(self.engine, self.mtp_loss_scale)
        set_mtp_depth_weights(self.engine, self.spec.mtp.depth_weights_at(
            self.state.step / self.spec.train.steps))
        set_hsm_step(self.engine, self.spec.train.seed, self.mesh.dp_rank, self.state.step + 1)
        self.lr = self.optimizer.param_groups[0]["lr"]
        batches = [self.loader.next_batch() for _ in range(self.num_microbatches)]
        step = self.state.step + 1
        output = self.engine.train_step(
            batches, before_norm=lambda chunks: self.faults.corrupt_gradients(step, chunks))
        self.scheduler.step()
        self.state.step = step
        self.state.tokens += self.tokens_per_step
        tb = self.writer.tb if self.writer is not None else None
        wandb = self.writer.wandb if self.writer is not None else None
        # a non-finite step's MTP losses stay out of the interval's averages
        self.mtp_metrics = MTPLossLoggingHelper.track_mtp_metrics(
            step, tb, wandb, totals.mtp_losses if output.applied else {})
        moe = self.moe_metrics.collect(self.engine.chunks, self.num_microbatches)
        seconds = time.perf_counter() - started
        if not output.applied:
            self._nonfinite_step(totals, output)
        else:
            self.guard.check(step, output.lm_loss, output.grad_norm)
            totals.add(output.lm_loss, seconds, self.mtp_metrics)
            totals.add_moe(moe)
        if self.writer is not None:
            self.writer.scalars(step, {"lm_loss": output.lm_loss, "lr": self.lr,
                                       "grad_norm": output.grad_norm,
                                       "tokens_per_s": self.tokens_per_step / seconds,
                                       **self.flop_rate.metrics(1, seconds), **moe})
        return output

    def _nonfinite_step(self, totals: IntervalMetrics, output: StepOutput) -> None:
        """Its own metrics line (null values, `"nonfinite": true`), then stop or skip."""
        if self.writer is not None:
            self.writer.write({"step": self.state.step, "tokens": self.state.tokens,
                               "lm_loss": output.lm_loss, "grad_norm": output.grad_norm,
                               "lr": self.lr, "skipped": self.spec.train.nonfinite != "stop"})
        self.guard.check(self.state.step, output.lm_loss, output.grad_norm)  # may stop
        totals.skipped += 1
        if self.progress is not None:
            self.progress.note(f"step {self.state.step}: non-finite (lm_loss {output.lm_loss}, "
                               f"grad_norm {output.grad_norm}): update skipped, "
                               f"{self.guard.in_a_row} in a row")

    def _log(self, totals: IntervalMetrics, output: StepOutput) -> None:
        """One metrics.jsonl line: losses and rates averaged over the interval's steps."""
        if self.writer is None or totals.steps == 0:
            return  # an interval of skipped steps only: their own lines say it all
        record: dict[str, Any] = {"step": self.state.step, "tokens": self.state.tokens,
                                  **totals.averages(self.depths, self.mtp_metrics)}
        record.update({
            "lr": self.lr, "grad_norm": output.grad_norm,
            **({} if output.mtp_grad_norm is None else {"mtp_grad_norm": output.mtp_grad_norm}),
            "tokens_per_s": self.tokens_per_step * totals.steps / totals.seconds,
            **self.flop_rate.metrics(totals.steps, totals.seconds),
            "peak_memory_mb": peak_memory_mb(self.env.device),
            "mtp_loss_scale": self.mtp_loss_scale, "skipped_steps": totals.skipped,
            "time": round(time.time(), 3),
        })
        self.writer.write({**record, "data_blend": self.data_note} if self.data_note else record)
        self.data_note = None
        self.progress.update(self.state.step, record)

    # --- validation and checkpoints ------------------------------------------------------------
    def _validate(self) -> None:
        """`train.eval_steps` global batches of the validation split; the line says how many
        tokens that is, since `mtp eval` scores its own `--tokens` (16,384 by default)."""
        result = self.engine.evaluate(self._loader(self.val_set, shuffle=False),
                                      self.spec.train.eval_steps * self.num_microbatches)
        if self.writer is not None:
            scored = self.spec.train.eval_steps * self.tokens_per_step
            self.writer.write({"step": self.state.step, "tokens": self.state.tokens,
                               "split": "val", "val_tokens": scored, **result})
            self.writer.scalars(self.state.step, result)
            text = " | ".join(f"{k[4:]} {v:.4f}" for k, v in result.items())
            self.progress.note(f"validation at step {self.state.step} ({scored:,} held-out "
                               f"tokens): {text}")

    def _save(self, output: StepOutput) -> None:
        losses = {"lm_loss": output.lm_loss}
        losses.update({f"mtp_{k}_loss": self.mtp_metrics.get(f"mtp_{k} loss", 0.0)
                       for k in range(1, self.depths + 1)})
        path = self.checkpointer.save(self.parts, self.state, losses)
        if self.progress is not None:
            self.progress.note(f"saved checkpoint {path.name}")
