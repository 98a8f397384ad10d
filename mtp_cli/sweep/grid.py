"""The grid of `mtp sweep`: `--vary KEY=V1,V2,...` flags -> cells (their cartesian product, the
first flag slowest), each cell x seed a run with its spec overrides. Every run's spec is loaded
and checked before anything runs, so a bad key or value exits 2 naming the `--vary` flag.

Seed s (0-based) trains with `train.seed` = the spec's seed + s in every cell: runs of one seed
share their initialisation seed and data order, so cells differ only by what they vary.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtp_cli.config import load_spec
from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import Problem, UserError

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]")


@dataclass(frozen=True)
class Vary:
    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its overrides in --vary order and its directory name."""

    settings: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return ",".join(f"{key}={value}" for key, value in self.settings)

    @property
    def slug(self) -> str:
        return _UNSAFE.sub("_", self.name.replace(",", "__"))[:200]

    def overrides(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.settings]


@dataclass
class Grid:
    spec_path: Path
    varies: list[Vary]
    seeds: int
    common: list[str] = field(default_factory=list)  # --set overrides of every run

    @property
    def cells(self) -> list[Cell]:
        values = [[(v.key, value) for value in v.values] for v in self.varies]
        return [Cell(tuple(choice)) for choice in itertools.product(*values)]

    def run_overrides(self, cell: Cell, seed: int, base_seed: int) -> list[str]:
        return [*self.common, *cell.overrides(), f"train.seed={base_seed + seed}"]

    def as_dict(self) -> dict[str, Any]:
        return {"spec": str(self.spec_path), "vary": [[v.key, list(v.values)] for v in self.varies],
                "seeds": self.seeds, "set": self.common}


def parse_vary(text: str) -> Vary:
    """`KEY=V1,V2,...` -> Vary; exit 2 naming the flag when it is not of that form."""
    key, sep, values = text.partition("=")
    key = key.strip()
    items = tuple(v.strip() for v in values.split(",")) if sep else ()
    if not sep or not _KEY.match(key) or not items or any(not v for v in items):
        raise UserError(problems=[Problem(f"{text!r} is not KEY=V1,V2,... (a dotted spec key "
                                          f"and comma-separated values)", key="--vary")])
    if len(set(items)) != len(items):
        raise UserError(problems=[Problem(f"{key}: a value repeats", key=f"--vary {key}")])
    return Vary(key, items)


def make_grid(spec_path: Path, vary: list[str], seeds: int, common: list[str]) -> Grid:
    if not vary:
        raise UserError(problems=[Problem("give at least one --vary KEY=V1,V2,...",
                                          key="--vary")])
    if seeds < 1:
        raise UserError(problems=[Problem("must be at least 1", key="--seeds")])
    varies = [parse_vary(text) for text in vary]
    keys = [v.key for v in varies]
    if len(set(keys)) != len(keys):
        raise UserError(problems=[Problem("a key is varied twice", key="--vary")])
    return Grid(Path(spec_path), varies, seeds, list(common))


def check_grid(grid: Grid) -> dict[Cell, RunSpec]:
    """Load every cell's spec (seed 0; seeds change only train.seed) before anything runs; a
    failure names the --vary flag whose value it is (or --set)."""
    load_spec(grid.spec_path)  # the file itself: its own errors name it
    if grid.common:
        _load(grid, [], "--set")
    specs = {}
    for cell in grid.cells:
        flag = "--vary " + ",".join(key for key, _ in cell.settings)
        for key, value in cell.settings:
            try:
                load_spec(grid.spec_path, [*grid.common, f"{key}={value}"])
            except UserError as error:
                raise UserError(problems=[Problem(f"{key}={value}: {_first_line(error)}",
                                                  key=f"--vary {key}")]) from None
        specs[cell] = _load(grid, cell.overrides(), flag)
    return specs


def _load(grid: Grid, overrides: list[str], flag: str) -> RunSpec:
    try:
        return load_spec(grid.spec_path, [*grid.common, *overrides])
    except UserError as error:
        raise UserError(problems=[Problem(f"{' '.join(overrides) or 'the spec'}: "
                                          f"{_first_line(error)}", key=flag)]) from None


def _first_line(error: UserError) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
