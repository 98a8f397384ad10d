"""`ParallelDims`: the sizes of the parallel layout, checked against the world size.

Pure arithmetic, no process groups, so the launcher can reject a layout before it starts any
process. Data-parallel size = world size / (tensor x pipeline x context).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtp_cli.errors import Problem, UserError
from mtp_cli.spec.schema import RunSpec

NOT_SUPPORTED_YET = {
    "tensor": "lands with the model-parallel issue",
    "pipeline": "lands with the model-parallel issue",
    "context": "lands with the context-parallel issue",
}


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
        """Derive the data-parallel size; a `UserError` when the model-parallel sizes do not
        divide the world size or the global batch does not split over the data-parallel ranks."""
        par = spec.parallel
        model_parallel = par.tensor * par.pipeline * par.context
        if world_size % model_parallel:
            raise UserError(problems=[Problem(
                f"tensor x pipeline x context = {par.tensor} x {par.pipeline} x {par.context} "
                f"= {model_parallel} does not divide the world size {world_size}",
                key="parallel",
                hint="world size = --nproc x --nnodes",
            )])
        dims = cls(world_size=world_size, dp=world_size // model_parallel, tp=par.tensor,
                   pp=par.pipeline, cp=par.context)
        dims.check_batch(spec)
        return dims

    def check_batch(self, spec: RunSpec) -> None:
        """The global batch must be a whole number of micro-batches on every data-parallel rank."""
        train = spec.train
        per_step = train.micro_batch_size * self.dp
        if train.global_batch_size % per_step:
            raise UserError(problems=[Problem(
                f"global_batch_size ({train.global_batch_size}) must be a multiple of "
                f"micro_batch_size x data-parallel size ({train.micro_batch_size} x {self.dp} "
                f"= {per_step})",
                key="train.global_batch_size",
                hint="change the batch sizes or --nproc",
            )])

    def check_supported(self) -> None:
        """Model and context parallel training are not wired into `mtp train` yet."""
        problems = [
            Problem(f"parallel.{name} = {size} is not supported yet; it {NOT_SUPPORTED_YET[name]}",
                    key=f"parallel.{name}")
            for name, size in (("tensor", self.tp), ("pipeline", self.pp), ("context", self.cp))
            if size > 1
        ]
        if problems:
            raise UserError(problems=problems)

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
