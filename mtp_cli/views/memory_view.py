"""How `mtp build --memory` and `mtp train --dry-run-rank` look on a terminal: one row per
pipeline rank, the tightest marked; a dry run's measured peaks next to the plan's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from mtp_cli.plan.memory import MemoryPlan, RankMemory

if TYPE_CHECKING:
    from mtp_cli.launch.dry_run import DryRunResult

GIB, MIB = 2**30, 2**20


def _unit(plan: MemoryPlan) -> tuple[str, int]:
    """GiB, or MiB for a plan whose tightest rank needs under 1 GiB."""
    return ("GiB", GIB) if plan.tightest.total >= GIB else ("MiB", MIB)


PHASES = {"backward": "bwd", "optimizer_step": "optim", "gradient_reduction": "reduce",
          "build": "build", "checkpoint": "ckpt"}


def _stages(rank: RankMemory) -> str:
    """What the rank holds: E embedding, tN decoder layers, mN MTP layers, L loss (per stage)."""
    parts = []
    for stage in rank.stages:
        kinds = stage.activations
        text = "".join(label for key, label in (("decoder", "t"), ("mtp", "m"), ("logits", "L"))
                       if key in kinds)
        parts.append(text or "-")
    return "|".join(parts)


def memory_table(plan: MemoryPlan) -> Table:
    dims = plan.dims
    unit, size = _unit(plan)

    def _gib(value: float) -> str:
        return f"{value / size:,.2f}"

    title = (f"Memory per pipeline rank ({unit}), world size {plan.world_size} = data {dims.dp} x tensor "
             f"{dims.tp} x pipeline {dims.pp} x context {dims.cp}"
             + (f", expert {plan.expert_parallel}" if plan.expert_parallel > 1 else "")
             + f"; {plan.num_microbatches} micro-batches per step, engine {plan.engine}")
    table = Table(title=title, show_header=True, header_style="bold")
    for name in ("rank", "stages", "weights", "grads", "adam", "bf16 cast",
                 "activations (alive)", "logits", "buffers", "total", "peak"):
        table.add_column(name, justify="left" if name in ("stages", "peak") else "right")
    tightest = plan.tightest.pp_rank
    for rank in plan.ranks:
        mark = "[bold red]" if rank.pp_rank == tightest else ""
        end = "[/]" if mark else ""
        buffers = sum(v for k, v in rank.buffers.items() if k != "optimizer_step")
        table.add_row(
            f"{mark}{rank.pp_rank}{end}", _stages(rank), _gib(rank.parameters),
            _gib(rank.gradients), _gib(rank.optimizer), _gib(rank.weight_cache),
            f"{_gib(rank.activations)} ({rank.alive_microbatches})", _gib(rank.logits),
            _gib(buffers), f"{mark}{_gib(rank.total)}{end}", PHASES[rank.peak_phase])
    return table


def render_memory(console: Console, plan: MemoryPlan) -> None:
    console.print(memory_table(plan))
    unit, size = _unit(plan)
    console.print("weights/grads fp32, adam = AdamW moments (fp32), bf16 cast = autocast's weight "
                  "copies, activations at the backward peak with the (chunk, micro-batch) "
                  "activations alive at once, logits = the heads' saved loss state of one "
                  "micro-batch (part of activations), buffers = DDP buckets / FSDP2 gathers / "
                  "gradient all-reduce; peak: the moment the total is reached", highlight=False)
    tight = plan.tightest
    line = (f"tightest: pipeline rank {tight.pp_rank}, {tight.total / size:,.2f} {unit} at its "
            f"{tight.peak_phase.replace('_', ' ')} peak")
    if plan.device_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        line += f"; {verdict} in {plan.device_memory / GIB:,.2f} GiB per device"
    console.print(line, highlight=False)
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)


def render_dry_run(console: Console, result: DryRunResult) -> None:
    """`mtp train --dry-run-rank`: the rank's losses, then measured peaks next to the plan's."""
    mib = 2**20
    console.print(
        f"dry run of rank {result.rank} of {result.world_size} (pipeline rank {result.pp_rank}), "
        f"{result.steps} steps on {result.device} in {result.seconds:.0f} s: lm loss "
        f"{', '.join(f'{x:.4f}' for x in result.losses)}; grad norm "
        f"{', '.join(f'{x:.4g}' for x in result.grad_norms)}", highlight=False, markup=False)
    console.print(
        f"peak memory: measured {result.measured_peak / mib:,.1f} MiB (live tensors; resident "
        f"set {result.rss_peak / mib:,.0f} MiB), plan {result.planned_total / mib:,.1f} MiB "
        f"(plan / measured = {result.ratio:.3f})", highlight=False, markup=False)
    console.print(
        f"building: measured {result.measured_build / mib:,.1f} MiB, plan "
        f"{result.planned_build / mib:,.1f} MiB", highlight=False, markup=False)
