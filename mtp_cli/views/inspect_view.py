"""How `mtp inspect-ckpt` looks on a terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mtp_cli.checkpoint import CheckpointMeta
from mtp_cli.config.schema import RunSpec
from mtp_cli.inspect.inspection import CheckpointInspection
from mtp_cli.plan.run_plan import mtp_depths


def _fmt_count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _header_lines(report: CheckpointInspection) -> list[str]:
    ckpt = report.checkpoint
    kind = "DCP checkpoint" if ckpt.kind == "dcp" else "torch.save state dict"
    lines = [f"[bold]{escape(str(ckpt.path))}[/] [dim]({kind})[/]"]
    facts = [f"step {ckpt.step:,}"] if ckpt.step is not None else []
    if ckpt.meta is not None:
        facts += _meta_facts(ckpt.meta)
    if facts:
        lines.append(" · ".join(facts))
    lines += [f"[dim]note: {escape(n)}[/]" for n in ckpt.notes]
    return lines


def _meta_facts(meta: CheckpointMeta) -> list[str]:
    """Tokens, last losses, layout and MTP acceptance, as far as meta.json records them."""
    facts = []
    if meta.tokens is not None:
        facts.append(f"tokens {meta.tokens:,}")
    if meta.losses:
        facts.append("last losses " + ", ".join(f"{k} {_num(v)}" for k, v in
                                                 meta.losses.items()))
    if meta.parallel is not None:
        world = meta.world_size if meta.world_size is not None else "?"
        facts.append(f"world size {world} ("
                     + ", ".join(f"{k} {v}" for k, v in meta.parallel.items()) + ")")
    acceptance = _cumulative_acceptance(meta.mtp_cumulative)
    if acceptance:
        facts.append(f"cumulative acceptance {acceptance}")
    return facts


def _cumulative_acceptance(cumulative: Any) -> str:
    """`mtp_1 41.2% (103/250), ...` from meta.json's correct/total counts."""
    if not isinstance(cumulative, dict):
        return ""
    correct, total = cumulative.get("correct") or [], cumulative.get("total") or []
    return ", ".join(f"mtp_{k} {100 * c / t:.1f}% ({c}/{t})"
                     for k, (c, t) in enumerate(zip(correct, total, strict=False), start=1)
                     if isinstance(c, int | float) and isinstance(t, int | float) and t)


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _spec_line(spec: RunSpec, source: str) -> str:
    m, mtp, par = spec.model, spec.mtp, spec.parallel
    lam = mtp.loss_scaling_factor if not isinstance(mtp.loss_scaling_factor, list) else \
        "schedule"
    return (f"spec ({source}): vocab {m.vocab_size}, hidden {m.hidden_size}, layers "
            f"{m.num_layers}, heads {m.num_attention_heads}/{m.num_query_groups}, ffn "
            f"{m.ffn_hidden_size}, seq {m.seq_length}, {m.normalization}, {m.activation}, "
            f"{m.position_embedding}, tied output {m.share_embeddings_and_output_weights}; "
            f"mtp D={mtp_depths(spec)}, λ={lam}, repeated layer {mtp.use_repeated_layer}, "
            f"detach heads {mtp.detach_heads}; parallel tp {par.tensor}, pp {par.pipeline}, "
            f"cp {par.context}")


def _layout_line(report: CheckpointInspection) -> str:
    layout = report.layout
    bits = [f"{layout.naming.style} names", f"D={layout.depths} (from {layout.depth_origin})"]
    for label, value in (("N", layout.main_layers), ("hidden", layout.hidden_size),
                         ("vocab", layout.vocab_size), ("output tied", layout.tied_output),
                         ("MTP layer", layout.transformer_layer_name)):
        if value is not None:
            bits.append(f"{label} {value}")
    return "layout: " + ", ".join(bits)


def parts_table(report: CheckpointInspection) -> Table:
    with_spec = report.expected_parameters is not None
    table = Table(title="Tensors by part", header_style="bold")
    for column, justify in (("part", "left"), ("tensors", "right"), ("parameters", "right")):
        table.add_column(column, justify=justify)
    if with_spec:
        table.add_column("spec predicts", justify="right")
    table.add_column("dtypes")
    for row in report.parts:
        cells = [row.label, f"{row.tensors:,}", f"{row.parameters:,}"]
        if with_spec:
            expected = row.expected_parameters
            mark = "" if expected == row.parameters else " [red]≠[/]"
            cells.append(_fmt_count(expected) + mark)
        table.add_row(*cells, ", ".join(sorted(row.dtypes)))
    table.add_section()
    total = ["[bold]total[/]", f"{len(report.checkpoint.tensors):,}",
             f"[bold]{report.stored_parameters:,}[/]"]
    if with_spec:
        total.append(f"[bold]{report.expected_parameters:,}[/]")
    table.add_row(*total, "")
    return table


def print_checks(console: Console, report: CheckpointInspection) -> None:
    """One line per check (never truncated, so tensor names stay greppable)."""
    console.print("[bold]Checks[/]")
    width = max(len(check.name) for check in report.checks)
    for check in report.checks:
        result = "[green]pass[/]" if check.passed else "[bold red]FAIL[/]"
        console.print(f"  {result}  {check.name:<{width}}  {escape(check.reason)}",
                      soft_wrap=True, highlight=False)
        if check.note:
            console.print(f"        {'':<{width}}  [yellow]note:[/] {escape(check.note)}",
                          soft_wrap=True, highlight=False)


def print_tensors(console: Console, report: CheckpointInspection) -> None:
    """The `--tensors` matches, one aligned line each."""
    matched = report.matched or []
    console.print(f"[bold]Tensors matching[/] ({len(matched)})")
    if not matched:
        return
    name_w = max(len(info.name) for info in matched)
    shape_w = max(len(str(tuple(info.shape))) for info in matched)
    for info in matched:
        console.print(f"  {escape(info.name):<{name_w}}  {tuple(info.shape)!s:<{shape_w}}  "
                      f"{info.dtype:<8}  {info.numel:>12,}", soft_wrap=True, highlight=False)


def render_inspect(console: Console, report: CheckpointInspection) -> None:
    for line in _header_lines(report):
        console.print(line, highlight=False, soft_wrap=True)
    if report.spec is not None:
        console.print(escape(_spec_line(report.spec, report.spec_source or "")), highlight=False,
                      soft_wrap=True)
    console.print(escape(_layout_line(report)), highlight=False, soft_wrap=True)
    console.print(parts_table(report))
    sections = report.sections()
    if sections:
        listed = "; ".join(f"{s['section']} ({s['tensors']} tensors, {s['elements']:,} elements, "
                           f"{s['values']} values)" for s in sections)
        console.print(f"[dim]also stored: {escape(listed)}[/]", soft_wrap=True)
    skipped = report.checkpoint.skipped
    if skipped:
        shown = ", ".join(skipped[:4]) + (f" and {len(skipped) - 4} more" if len(skipped) > 4
                                          else "")
        console.print(f"[yellow]skipped {len(skipped)} entries that are not plain tensors "
                      f"(never unpickled):[/] {escape(shown)}", highlight=False, soft_wrap=True)
    if report.matched is not None:
        print_tensors(console, report)
    print_checks(console, report)
    failed = [c.name for c in report.checks if not c.passed]
    if failed:
        console.print(f"[bold red]{len(failed)} check(s) failed:[/] {', '.join(failed)}")
    else:
        console.print("[bold green]all checks passed[/]")
