"""`ParallelDims`: the sizes of the parallel layout, checked against the world size.

Pure arithmetic, no process groups, so the launcher can reject a layout before it starts any
process. Data-parallel size = world size / (tensor x pipeline x context).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import Problem, UserError


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
        if dims.dp_cp % par.expert:
            raise UserError(problems=[Problem(
                f"expert parallel size {par.expert} must divide data x context = {dims.dp} x "
                f"{dims.cp} = {dims.dp_cp} (the expert group is carved from those ranks)",
                key="parallel.expert",
                hint="world size = tensor x pipeline x context x data; raise --nproc")])
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
        self.check_group_size(spec)

    def check_group_size(self, spec: RunSpec) -> None:
        """The interleaved schedule's rules on g = microbatch_group_size_per_vp_stage (default:
        pipeline) against M, the micro-batches of a step on a data-parallel rank."""
        par = spec.parallel
        if (par.virtual_pipeline or 1) == 1:
            return
        count = self.num_microbatches(spec)
        problem = group_size_problem(self.pp, count, par.microbatch_group_size_per_vp_stage
                                     or self.pp)
        if problem is None:
            return
        default = "" if par.microbatch_group_size_per_vp_stage else " (g defaults to pipeline)"
        raise UserError(problems=[Problem(
            f"{problem}{default}; M = global_batch_size / (micro_batch_size x data-parallel "
            f"size) = {spec.train.global_batch_size} / ({spec.train.micro_batch_size} x "
            f"{self.dp}) = {count}",
            key="parallel.microbatch_group_size_per_vp_stage",
            hint="change the batch sizes, --nproc or parallel.microbatch_group_size_per_vp_stage",
        )])

    def check_supported(self, spec: RunSpec) -> None:
        """Combinations `mtp train` does not run, refused before anything is launched."""
        model_parallel = self.tp > 1 or self.pp > 1 or self.cp > 1
        problems = []
        if spec.model.backend == "te" and model_parallel:
            problems.append(Problem(
                "tensor, pipeline and context parallel run the local backend only",
                key="model.backend", hint="set model.backend=local"))
        problems += self._moe_mla_unsupported(spec)
        if problems:
            raise UserError(problems=problems)

    @staticmethod
    def _moe_mla_unsupported(spec: RunSpec) -> list[Problem]:
        """Expert tensor parallel runs at 1 (experts whole) and at the tensor-parallel size
        (experts split over the tensor ranks, Megatron-Core's usual setting), bias-free."""
        problems = []
        etp, tp = spec.parallel.expert_tensor, spec.parallel.tensor
        if etp not in (1, tp):
            problems.append(Problem(
                f"expert tensor parallel size {etp} is not run: parallel.expert_tensor runs at "
                f"1 (routed experts whole on every tensor rank) or at parallel.tensor ({tp}: "
                "routed experts split over the tensor ranks)",
                key="parallel.expert_tensor", hint=f"set parallel.expert_tensor=1 or {tp}"))
        elif etp > 1 and spec.model.add_bias_linear and spec.model.num_moe_experts is not None:
            problems.append(Problem(
                "expert tensor parallel splits bias-free routed experts only (a row-parallel "
                "expert's bias would be added on every tensor rank)",
                key="parallel.expert_tensor",
                hint="set model.add_bias_linear=false or parallel.expert_tensor=1"))
        return problems

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


def group_size_problem(pp: int, num_microbatches: int, group_size: int) -> str | None:
    """What breaks Megatron-Core's rules on the interleaved schedule's micro-batch group size g
    (`microbatch_group_size_per_vp_stage`) for M micro-batches, or None: pp <= g <= M, and
    M mod g is 0 or at least pp (a smaller last group stalls the pipeline; Megatron refuses it).
    """
    if not pp <= group_size <= num_microbatches:
        return (f"the number of contiguous micro-batches in a virtual pipeline stage "
                f"({group_size}) must range in [pipeline={pp}, M={num_microbatches}]")
    remainder = num_microbatches % group_size
    if 0 < remainder < pp:
        return (f"M ({num_microbatches}) mod microbatch_group_size_per_vp_stage ({group_size}) "
                f"must be 0 or at least pipeline ({pp}), it is {remainder}: a last group "
                f"smaller than the pipeline leaves dependency bubbles")
    return None
