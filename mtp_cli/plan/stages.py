"""The one `Stage` type: what a (pp_rank, vp_stage) of the pipeline holds and builds.

`mtp_cli.plan.placement.build_stage_plan(spec)` lists the stages in layer order
(`stage = vp_stage * pipeline + pp_rank`, the order of a layout string); `StagePlan.stage(pp_rank,
vp_stage)` is what `build_model(spec, device, stage=...)` builds for one of them: only its layers,
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


@dataclass(frozen=True)
class Stage:
    """One (pp_rank, vp_stage); the whole model is the single stage that holds everything.

    `vp_stage` is None without virtual pipeline stages. `decoder_offset` and `mtp_layer_offset`
    are the 0-based global indices of the stage's first decoder / MTP layer, or of the next one
    when it holds none (Megatron-Core counts MTP offsets only with a layout and pipeline > 1);
    `decoder_offset` defaults to what `decoder_layers` implies.
    """

    decoder_layers: tuple[int, ...] = ()  # global, 1-based
    mtp_layers: int = 0
    mtp_layer_offset: int = 0
    embedding: bool = True
    loss: bool = True  # output layer, main loss, MTP loss step
    final_layernorm: bool = True
    mtp_depths_in_loss: int = 0  # D on the loss stage (it splits the MTP hidden states)
    pp_rank: int = 0
    vp_stage: int | None = None
    standalone_mtp: bool = False
    decoder_offset: int = -1  # -1: derived from decoder_layers

    def __post_init__(self) -> None:
        if self.decoder_offset < 0:
            derived = self.decoder_layers[0] - 1 if self.decoder_layers else 0
            object.__setattr__(self, "decoder_offset", derived)

    @classmethod
    def whole_model(cls, num_layers: int, mtp_depths: int) -> Stage:
        return cls(decoder_layers=tuple(range(1, num_layers + 1)), mtp_layers=mtp_depths,
                   mtp_depths_in_loss=mtp_depths)

    @property
    def needs_embedding(self) -> bool:
        """The first stage holds the embedding; an MTP stage keeps a copy to embed rolled ids."""
        return self.embedding or self.mtp_layers > 0

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


@dataclass(frozen=True)
class StagePlan:
    """Every stage of a spec's pipeline, in layer order."""

    pipeline: int
    virtual_pipeline: int | None  # None without virtual stages
    mtp_depths: int
    stages: tuple[Stage, ...]
    from_layout: bool = False

    @property
    def virtual_size(self) -> int:
        """Virtual stages per pipeline rank (1 without virtual stages)."""
        return self.virtual_pipeline or 1

    def stage(self, pp_rank: int, vp_stage: int | None = None) -> Stage:
        """The stage of (pp_rank, vp_stage); vp_stage is ignored without virtual stages."""
        if not 0 <= pp_rank < self.pipeline:
            raise ValueError(f"pp_rank {pp_rank} is outside pipeline size {self.pipeline}")
        if self.virtual_pipeline is None:
            return self.stages[pp_rank]
        if vp_stage is None or not 0 <= vp_stage < self.virtual_pipeline:
            raise ValueError(f"vp_stage must be in [0, {self.virtual_pipeline}), got {vp_stage}")
        return self.stages[vp_stage * self.pipeline + pp_rank]

    def stages_of_rank(self, pp_rank: int) -> list[Stage]:
        """The stages pipeline rank `pp_rank` holds, in virtual-stage order."""
        return [s for s in self.stages if s.pp_rank == pp_rank]

    def as_dicts(self) -> list[dict[str, Any]]:
        return [stage.as_dict() for stage in self.stages]
