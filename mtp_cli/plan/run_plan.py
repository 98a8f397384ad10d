"""`RunPlan`: the facts a checked spec implies, computed once and passed down.

The MTP depths, the stage plan (which pipeline rank and virtual stage holds which layers, from
the layout or the even split) and, once the world size is known, the parallel sizes. Code below
the plan reads these from it instead of re-reading `spec.mtp.num_layers` or re-parsing the
layout; `tests/test_plan_reads.py` counts the raw reads left outside `config/` and `plan/`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtp_cli.config.schema import RunSpec
from mtp_cli.plan.dims import ParallelDims
from mtp_cli.plan.placement import build_stage_plan
from mtp_cli.plan.stages import Stage, StagePlan


@dataclass(frozen=True)
class RunPlan:
    """One spec's derived plan; `dims` is None until a world size is given."""

    spec: RunSpec
    stages: StagePlan
    dims: ParallelDims | None = None

    @classmethod
    def of(cls, spec: RunSpec, world_size: int | None = None) -> RunPlan:
        """The plan of a loaded spec (its rules passed at load); with `world_size`, also the
        parallel sizes, after the world-size rules (`SpecError` at the key's line)."""
        dims = ParallelDims.from_spec(spec, world_size) if world_size is not None else None
        return cls(spec, build_stage_plan(spec), dims)

    @property
    def depths(self) -> int:
        """D, the MTP depths (0: no MTP)."""
        return self.stages.mtp_depths

    @property
    def num_layers(self) -> int:
        """Decoder layers N (MTP layers not included)."""
        return self.spec.model.num_layers

    @property
    def whole_model(self) -> Stage:
        """The stage of a model that holds every layer (one process, no pipeline)."""
        return Stage.whole_model(self.num_layers, self.depths)

    @property
    def mtp_repeats(self) -> int:
        """How often each built MTP layer runs: D with `use_repeated_layer`, else once."""
        return self.depths if self.spec.mtp.use_repeated_layer else 1


def whole_model_stage(spec: RunSpec) -> Stage:
    """The stage holding every layer of a loaded spec's model (no stage plan needed)."""
    return Stage.whole_model(spec.model.num_layers, mtp_depths(spec))


def mtp_depths(spec: RunSpec) -> int:
    """D of a loaded spec, for code that holds a spec and no plan (the plan's `depths`)."""
    return spec.mtp.num_layers
