"""The stage plan: what every (pp_rank, vp_stage) builds, computed before anything is launched.

`build_stage_plan(spec)` lists the stages in layer order (`stage = vp_stage * pipeline + pp_rank`,
the order of a layout string). `StagePlan.stage_contents(pp_rank, vp_stage)` turns one entry into
the `StageContents` that `build_model(spec, device, stage=...)` builds: only that stage's layers,
under their global names and layer numbers. Copies of tied weights follow the reference:

- a stage holding MTP layers but not the embedding keeps its own copy of the embedding (to embed
  the rolled tokens);
- the loss stage keeps a copy of the word embedding as its output weight when embeddings and
  output are tied (`GPTModel` builds `output_layer` there unless it holds the embedding anyway);
- a standalone MTP stage (not on the last pipeline rank) builds no output layer: the MTP logits
  and losses are computed on the loss stage, which gets `mtp_depths_in_loss = D`.

With MTP enabled the decoder's final norm sits on the stage holding decoder layer N (its output
h0 feeds the MTP block); without MTP, on the loss stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mtp_cli.models.gpt import StageContents
from mtp_cli.mtp.placement import Placement, resolve_placement
from mtp_cli.spec.schema import RunSpec


@dataclass(frozen=True)
class StageEntry:
    """One (pp_rank, vp_stage). `vp_stage` is None without virtual pipeline stages."""

    pp_rank: int
    vp_stage: int | None
    decoder_layers: tuple[int, ...]  # global, 1-based
    mtp_layers: int
    mtp_layer_offset: int  # 0-based global index of this stage's first MTP layer
    embedding: bool
    loss: bool
    standalone_mtp: bool
    final_layernorm: bool

    def as_dict(self) -> dict[str, Any]:
        """The `mtp build --json` fields of this stage (without `parameters`)."""
        return {
            "pp_rank": self.pp_rank,
            "vp_stage": self.vp_stage,
            "decoder_layers": list(self.decoder_layers),
            "mtp_layers": self.mtp_layers,
            "mtp_layer_offset": self.mtp_layer_offset,
            "embedding": self.embedding,
            "loss": self.loss,
            "standalone_mtp": self.standalone_mtp,
        }

    def stage_contents(self, mtp_depths: int) -> StageContents:
        """What `build_model` builds for this stage; `mtp_depths` is the spec's D."""
        return StageContents(
            decoder_layer_numbers=list(self.decoder_layers),
            embedding=self.embedding,
            final_layernorm=self.final_layernorm,
            mtp_num_layers=self.mtp_layers,
            mtp_layer_offset=self.mtp_layer_offset,
            loss=self.loss,
            mtp_depths_in_loss=mtp_depths if self.loss else 0,
        )


@dataclass(frozen=True)
class StagePlan:
    """Every stage of a spec's pipeline, in layer order."""

    pipeline: int
    virtual_pipeline: int | None  # None without virtual stages
    mtp_depths: int
    stages: tuple[StageEntry, ...]

    def entry(self, pp_rank: int, vp_stage: int | None = None) -> StageEntry:
        """The entry of (pp_rank, vp_stage); vp_stage is ignored without virtual stages."""
        if not 0 <= pp_rank < self.pipeline:
            raise ValueError(f"pp_rank {pp_rank} is outside pipeline size {self.pipeline}")
        if self.virtual_pipeline is None:
            return self.stages[pp_rank]
        if vp_stage is None or not 0 <= vp_stage < self.virtual_pipeline:
            raise ValueError(f"vp_stage must be in [0, {self.virtual_pipeline}), got {vp_stage}")
        return self.stages[vp_stage * self.pipeline + pp_rank]

    def stage_contents(self, pp_rank: int, vp_stage: int | None = None) -> StageContents:
        return self.entry(pp_rank, vp_stage).stage_contents(self.mtp_depths)

    def as_dicts(self) -> list[dict[str, Any]]:
        return [entry.as_dict() for entry in self.stages]


def build_stage_plan(spec: RunSpec) -> StagePlan:
    """The plan of a validated spec (its layout, or the even/uneven split)."""
    return plan_from_placement(resolve_placement(spec), spec.model.num_layers, spec.mtp.num_layers)


def plan_from_placement(placement: Placement, num_layers: int, mtp_depths: int) -> StagePlan:
    virtual = placement.virtual_pipeline if placement.virtual_pipeline > 1 else None
    last_rank = placement.pipeline - 1
    entries = []
    for stage in placement.stages:
        numbers = tuple(range(stage.decoder_offset + 1,
                              stage.decoder_offset + stage.decoder_layers + 1))
        holds_last_layer = bool(numbers) and numbers[-1] == num_layers
        entries.append(StageEntry(
            pp_rank=stage.pp_rank,
            vp_stage=stage.vp_stage if virtual is not None else None,
            decoder_layers=numbers,
            mtp_layers=stage.mtp_layers,
            # Megatron-Core counts MTP offsets only with a layout and pipeline > 1.
            mtp_layer_offset=stage.mtp_offset if placement.from_layout and placement.pipeline > 1
            else 0,
            embedding=stage.embedding,
            loss=stage.loss,
            standalone_mtp=stage.mtp_layers > 0 and stage.pp_rank != last_rank,
            final_layernorm=holds_last_layer if mtp_depths > 0 else stage.loss,
        ))
    return StagePlan(placement.pipeline, virtual, mtp_depths, tuple(entries))
