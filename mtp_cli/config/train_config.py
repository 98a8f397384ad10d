"""The spec's `train` section: optimisation, schedule, batch sizes, non-finite handling,
recomputation and freezing, with its loss settings (`train.loss`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from mtp_cli.config.base import NonNegativeInt, PositiveInt, StrictModel


class LossConfig(StrictModel):
    """How the cross-entropy of the main head and every MTP depth is computed."""

    chunked: Literal["auto", True, False] = Field(
        default="auto",
        description="Chunked linear cross-entropy (never holds full logits); auto = by size.",
    )


class TrainConfig(StrictModel):
    """Optimisation. Batch sizes are in samples of seq_length tokens."""

    steps: PositiveInt = Field(default=200, description="Optimizer steps.")
    micro_batch_size: PositiveInt = Field(
        default=4, description="Samples per forward/backward on one data-parallel rank."
    )
    global_batch_size: PositiveInt = Field(
        default=8, description="Samples per optimizer step over all data-parallel ranks."
    )
    lr: Annotated[float, Field(gt=0)] = Field(default=3e-3, description="Peak learning rate.")
    min_lr: Annotated[float, Field(ge=0)] = Field(
        default=3e-4, description="Learning rate at the end of the cosine decay."
    )
    warmup_steps: NonNegativeInt = Field(
        default=10, description="Steps of linear warmup from 0 to lr."
    )
    decay_steps: PositiveInt | None = Field(
        default=None,
        description="Step at which the cosine reaches min_lr (default: train.steps). Keep it "
        "when extending train.steps on resume, so the schedule is not stretched again.",
    )
    weight_decay: Annotated[float, Field(ge=0)] = Field(
        default=0.1, description="AdamW weight decay (not on biases and norm scales)."
    )
    adam_beta1: Annotated[float, Field(ge=0, lt=1)] = Field(default=0.9, description="AdamW beta1.")
    adam_beta2: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.95, description="AdamW beta2."
    )
    adam_eps: Annotated[float, Field(gt=0)] = Field(default=1e-8, description="AdamW epsilon.")
    grad_clip: Annotated[float, Field(ge=0)] = Field(default=1.0, description="0 = off.")
    seed: NonNegativeInt = Field(
        default=1234, description="Seed of the weights, dropout and the data order."
    )
    eval_interval: NonNegativeInt = Field(default=50, description="0 = no validation.")
    eval_steps: PositiveInt = Field(default=4, description="Global batches per validation.")
    log_interval: PositiveInt = Field(
        default=1, description="Steps per metrics.jsonl line (averaged over them)."
    )
    bf16: bool = Field(default=False, description="bf16 autocast (weights stay fp32).")
    calculate_per_token_loss: bool = Field(
        default=False, description="Normalise by the step's total loss tokens (Megatron)."
    )
    loss: LossConfig = Field(
        default_factory=LossConfig, description="How the cross-entropy is computed."
    )
    nonfinite: Literal["stop", "skip_step"] = Field(
        default="stop",
        description="On a non-finite loss or gradient norm: stop (exit 1, before any checkpoint "
        "of that state), or skip_step (drop the update; step, schedule and data move on).",
    )
    nonfinite_max_skips: PositiveInt = Field(
        default=5,
        description="skip_step: the most consecutive steps skipped; one more non-finite step "
        "in a row stops the run.",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Parameters kept fixed (no gradient, no optimizer state): parts "
        "(embedding, decoder, output_layer, mtp), dotted prefixes (decoder.layers.0) or glob "
        "patterns on parameter names (decoder.layers.*.mlp.*).",
    )
    recompute: Literal["none", "full", "selective"] = Field(
        default="none",
        description="Activation recomputation: full = every decoder and MTP layer, "
        "selective = the attention core; losses and gradients unchanged.",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile each decoder and MTP transformer layer on its own "
        "(torchtitan's per-block compile); off by default (slower on CPU, see README).",
    )

    @model_validator(mode="after")
    def _fill_defaults(self) -> TrainConfig:
        if self.decay_steps is None:
            self.decay_steps = self.steps
        return self
