"""How a module asks tensor parallelism to split it: a rule declared beside the module's class.

torchtitan keeps each model's `parallelize` plan beside the model. Here each module class that
tensor parallelism changes says how, in its own file, with a `tensor_parallel_rule()` method that
returns plain data: which child linear is column-parallel, row-parallel or kept whole, and which
seams take a parallel region. `mtp_cli.parallel.tensor_parallel` applies the rules of the modules
it finds and knows no model class by name, so a new module states its own layout and the
transform does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# column: output rows split; gated_column: `[gate; up]` rows, each half split on its own;
# row: input columns split (bias whole); duplicate: the whole linear on every rank.
Split = Literal["column", "gated_column", "row", "duplicate"]


@dataclass(frozen=True)
class LinearSplit:
    """How the child linear `attr` is split over the tensor-parallel ranks."""

    attr: str
    split: Split
    gather_output: bool = False  # column: all-gather the output back to the whole width


@dataclass(frozen=True)
class TensorParallelRule:
    """A module's tensor-parallel layout. Routed experts (`...local_experts.*`) keep their
    linears whole unless expert tensor parallel is on; then their linears split the same way,
    with no communication of their own."""

    linears: tuple[LinearSplit, ...] = ()
    # The attribute that takes a region shared by the local heads (MLA's RoPE key: whole on
    # every rank, its gradient summed over the ranks; under sequence parallel, gathered first).
    shared_across_heads: str | None = None
    # The attribute holding the MoE token dispatcher, wrapped under expert tensor parallel so
    # that the tokens enter and leave the experts' region.
    expert_dispatcher: str | None = None
