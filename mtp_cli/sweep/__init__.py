"""`mtp sweep`: a grid of runs over spec keys and seeds, evaluated alike and compared with
statistics (grid.py: the cells and their checks; runner.py: training, eval and the decoding
probe; timeline.py: elapsed time from the logs; stats.py: Welch's test without scipy;
report.py: the figures of a sweep directory; plot.py: its PNG with seed bands)."""

from mtp_cli.sweep.grid import Grid, make_grid
from mtp_cli.sweep.report import summarize
from mtp_cli.sweep.runner import run_sweep, write_report

__all__ = ["Grid", "make_grid", "run_sweep", "summarize", "write_report"]
