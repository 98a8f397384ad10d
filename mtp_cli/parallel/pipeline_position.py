"""`PipelinePosition`: where one pipeline rank sits, read from the stage plan.

Its local chunks are the plan's stages of that rank in virtual-stage order (global stage index
`vp_stage x pp + pp_rank`), and it knows the shape of what crosses each stage boundary: hidden
states `[s, b, h]`, or `[(1+D) s, b, h]` after the first stage holding MTP layers (the main
stream and every depth's stream travel together, as Megatron's standalone MTP stage sends them).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtp_cli.plan.stages import Stage, StagePlan


@dataclass(frozen=True)
class PipelinePosition:
    """This rank's place in the pipeline. `hidden_shape` is one micro-batch's `[s, b, h]` as it
    travels (s already divided by context parallel, and by tensor parallel under sequence
    parallel)."""

    plan: StagePlan
    pp_rank: int
    hidden_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        for index, stage in enumerate(self.plan.stages):
            if stage.pp_rank != index % self.plan.pipeline:
                raise ValueError(f"stage {index} sits on pp_rank {stage.pp_rank}; the plan must "
                                 f"list stages as vp_stage x pipeline + pp_rank")
        if not 0 <= self.pp_rank < self.plan.pipeline:
            raise ValueError(f"pp_rank {self.pp_rank} is outside pipeline {self.plan.pipeline}")

    @property
    def pp_size(self) -> int:
        return self.plan.pipeline

    @property
    def num_chunks(self) -> int:
        """Virtual stages (model chunks) on this rank."""
        return self.plan.virtual_size

    @property
    def num_stages(self) -> int:
        return len(self.plan.stages)

    @property
    def stages(self) -> list[Stage]:
        """This rank's stages, one per chunk, in chunk order."""
        return self.plan.stages_of_rank(self.pp_rank)

    @property
    def next_rank(self) -> int:
        return (self.pp_rank + 1) % self.pp_size

    @property
    def prev_rank(self) -> int:
        return (self.pp_rank - 1) % self.pp_size

    def stage_index(self, chunk: int) -> int:
        return chunk * self.pp_size + self.pp_rank

    def is_last_stage(self, chunk: int) -> bool:
        return self.stage_index(chunk) == self.num_stages - 1

    @property
    def mtp_stage_index(self) -> int | None:
        """The first stage holding MTP layers (None without MTP)."""
        return next((i for i, s in enumerate(self.plan.stages) if s.mtp_layers), None)

    def output_shape(self, stage_index: int) -> tuple[int, int, int]:
        """Shape of stage `stage_index`'s output (and of its gradient)."""
        seq, batch, hidden = self.hidden_shape
        mtp = self.mtp_stage_index
        rows = (1 + self.plan.mtp_depths) * seq if mtp is not None and stage_index >= mtp else seq
        return (rows, batch, hidden)
