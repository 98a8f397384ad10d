"""How `mtp build` looks on a terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from mtp_cli.facts.describe import BuildDescription
from mtp_cli.views.model_tree import module_tree


def parameter_table(report: BuildDescription) -> Table:
    counts = report.counts
    table = Table(title="Parameters", show_header=True, header_style="bold")
    table.add_column("part")
    table.add_column("parameters", justify="right")
    table.add_row("embedding", f"{counts.embedding:,}")
    table.add_row("decoder", f"{counts.decoder:,}")
    for depth, count in enumerate(counts.mtp, start=1):
        table.add_row(f"mtp depth {depth}", f"{count:,}")
    tied = " (tied: word embedding)" if report.spec.model.share_embeddings_and_output_weights else ""
    table.add_row(f"output layer{tied}", f"{counts.output_layer:,}")
    table.add_section()
    table.add_row("[bold]total[/] (each part counted)", f"[bold]{counts.total:,}[/]")
    table.add_row("unique tensors", f"{counts.unique:,}")
    table.add_row("shared (tied or repeated)", f"{counts.total - counts.unique:,}")
    if counts.experts:
        table.add_section()
        table.add_row("routed experts (decoder)", f"{counts.experts:,}")
        table.add_row("activated per token (MTP excluded)", f"{counts.activated:,}")
    return table


def _layer_ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7' (decoder layers are contiguous per stage; stay general)."""
    if not numbers:
        return "-"
    runs: list[list[int]] = [[numbers[0], numbers[0]]]
    for n in numbers[1:]:
        if n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def stage_table(report: BuildDescription) -> Table:
    """The pipeline stage plan, one row per (pp_rank, vp_stage) in layer order."""
    spec = report.spec
    virtual = spec.parallel.virtual_pipeline or 1
    title = f"Pipeline stages (pipeline {spec.parallel.pipeline}"
    title += f" x {virtual} virtual)" if virtual > 1 else ")"
    table = Table(title=title, show_header=True, header_style="bold")
    for name, justify in (("pp", "right"), ("vp", "right"), ("decoder layers", "left"),
                          ("mtp", "right"), ("mtp offset", "right"), ("holds", "left")):
        table.add_column(name, justify=justify)
    table.add_column("parameters", justify="right", no_wrap=True)
    expert = spec.parallel.expert
    if expert > 1:
        table.add_column(f"per rank (expert {expert})", justify="right", no_wrap=True)
    for stage in report.extra["stages"]:
        holds = [name for name in ("embedding", "loss") if stage[name]]
        if stage["standalone_mtp"]:
            holds.append("standalone mtp")
        table.add_row(
            str(stage["pp_rank"]),
            "-" if stage["vp_stage"] is None else str(stage["vp_stage"]),
            _layer_ranges(stage["decoder_layers"]),
            str(stage["mtp_layers"]),
            str(stage["mtp_layer_offset"]),
            ", ".join(holds) or "-",
            f"{stage['parameters']:,}",
            *([f"{stage['parameters_per_expert_rank']:,}"] if expert > 1 else []),
        )
    return table


def render_build(console: Console, report: BuildDescription, title: str) -> None:
    spec = report.spec
    console.print(module_tree(report.model, f"{title} [dim]({spec.model.backend} backend, "
                                            f"D={report.model.stage.mtp_layers})[/]"))
    console.print(parameter_table(report))
    if spec.parallel.pipeline > 1 and report.extra.get("stages"):
        console.print(stage_table(report))
    materialized = report.extra.get("materialize")
    if materialized:
        mtp = ", ".join(f"mtp_{i} {v:.4f}" for i, v in enumerate(materialized["mtp_losses"], 1))
        console.print(
            f"materialized: lm loss {materialized['lm_loss']:.4f}"
            + (f", {mtp}" if mtp else "")
            + f"; gradients finite: {materialized['gradients_finite']}; forward+backward "
            f"{materialized['forward_backward_seconds']:.2f} s"
        )
    console.print(f"[dim]compiled on the meta device in {report.build_seconds:.2f} s[/]")
