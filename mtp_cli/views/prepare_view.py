"""`mtp data prepare`'s progress bar (documents, tokens, MB/s, ETA) and its summary."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from mtp_cli.data.prepare import PrepareSummary
from mtp_cli.data.prepare import Progress as PrepareProgress


class PrepareBar:
    """A rich bar over input bytes, redrawn from `prepare`'s progress callback.

    `auto_refresh=False`: no refresh thread, because `prepare` forks its workers and a fork
    must not copy a thread that may hold a lock."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar = Progress(
            TextColumn("[bold]prepare"), BarColumn(),
            TextColumn("{task.fields[documents]:>12,} docs {task.fields[tokens]:>15,} tokens"),
            TextColumn("{task.fields[rate]:>8.1f} MB/s"), TimeRemainingColumn(),
            console=console, auto_refresh=False, transient=True)
        self.task = self.bar.add_task("prepare", total=None, documents=0, tokens=0, rate=0.0)
        self.start = time.perf_counter()

    def __enter__(self) -> PrepareBar:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def update(self, progress: PrepareProgress) -> None:
        rate = progress.bytes_done / 1e6 / max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(self.task, total=progress.total_bytes, completed=progress.bytes_done,
                        documents=progress.documents, tokens=progress.tokens, rate=rate)
        self.bar.refresh()


def render_prepare(console: Console, summary: PrepareSummary) -> None:
    """Where the dataset went, what it holds, how fast it was made, and what was skipped."""
    table = Table(title=f"{summary.bin_path} + .idx", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("documents", f"{summary.documents:,} from {summary.inputs:,} file(s)"),
        ("tokens", f"{summary.tokens:,} ({summary.dtype}, {summary.bin_bytes / 1e6:,.1f} MB)"),
        ("tokenizer", f"{summary.tokenizer} (end of document {summary.eod}"
                      f"{', appended' if summary.append_eod else ''})"),
        ("throughput", f"{summary.input_bytes / 1e6:,.1f} MB in {summary.seconds:,.1f} s: "
                       f"{summary.mb_per_s:,.1f} MB/s, {summary.tokens_per_s:,.0f} tokens/s "
                       f"({summary.workers} worker(s))"),
    ]
    if summary.skipped:
        rows.append(("skipped", f"{summary.skipped:,} bad record(s)"))
    for name, value in rows:
        table.add_row(name, escape(value))
    console.print(table)
    for line in summary.skipped_records:
        console.print(f"  [yellow]skipped:[/] {escape(line)}", highlight=False, soft_wrap=True)
    if summary.skipped > len(summary.skipped_records):
        console.print(f"  ... and {summary.skipped - len(summary.skipped_records):,} more",
                      highlight=False)
