"""`ParallelDims`: the sizes of the parallel layout, checked against the world size.

Pure arithmetic, no process groups, so the launcher can reject a layout before it starts any
process (the rules themselves are in `mtp_cli.plan.rules`). Data-parallel size = world size /
(tensor x pipeline x context).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtp_cli.config.schema import RunSpec
from mtp_cli.plan.rules import located, unsupported, world_problems


@dataclass(frozen=True)
class ParallelDims:
    """World size and the size of every parallel dimension (`dp` is derived)."""

    world_size: int
    dp: int
    tp: int = 1
    pp: int = 1
    cp: int = 1

    @classmethod
    def from_spec(cls, spec: RunSpec, world_size: int) -> ParallelDims:
        """Derive the data-parallel size; a `SpecError` (`mtp_cli.plan.rules.world_problems`)
        when the model-parallel sizes do not divide the world size or the global batch does
        not split over the data-parallel ranks."""
        problems = world_problems(spec, world_size)
        if problems:
            raise located(spec, problems)
        par = spec.parallel
        return cls(world_size=world_size,
                   dp=world_size // (par.tensor * par.pipeline * par.context), tp=par.tensor,
                   pp=par.pipeline, cp=par.context)

    def check_supported(self, spec: RunSpec) -> None:
        """Combinations `mtp train` does not run (`mtp_cli.plan.rules.unsupported`)."""
        problems = unsupported(spec)
        if problems:
            raise located(spec, problems)

    @property
    def dp_cp(self) -> int:
        """Ranks that see different tokens of the same model replica's batch: data x context."""
        return self.dp * self.cp

    def num_microbatches(self, spec: RunSpec) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return spec.train.global_batch_size // (spec.train.micro_batch_size * self.dp)

    def as_dict(self) -> dict[str, int]:
        """The layout as written to a checkpoint's meta.json."""
        return {"data": self.dp, "tensor": self.tp, "pipeline": self.pp, "context": self.cp}

