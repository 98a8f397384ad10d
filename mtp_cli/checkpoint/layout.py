"""The names of the on-disk format, in one place: what a run directory and a checkpoint hold.

```
RUN_DIR/checkpoints/latest               LATEST: the name of the newest complete checkpoint
RUN_DIR/checkpoints/step_NNNNNNN/        checkpoint_name(step)
RUN_DIR/checkpoints/step_NNNNNNN/meta.json   META_JSON: the meta record (`checkpoint.meta`)
RUN_DIR/checkpoints/abandoned/           ABANDONED: checkpoints past the one a resume used
NAME.tmp-<random>                        TEMP_MARKER: a directory or file not yet published
```
Every other module asks these functions (or `RunDir`) for a path, so no module outside
`mtp_cli/checkpoint/` spells a name of the format (a test walks the syntax trees to hold that).
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META_JSON = "meta.json"
CHECKPOINT_PREFIX = "step_"
ABANDONED = "abandoned"
TEMP_MARKER = ".tmp-"
_CHECKPOINT_NAME = re.compile(r"step_(\d+)")


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint directory name (`step_0000300` -> 300); None for other names."""
    match = _CHECKPOINT_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def is_published(name: str) -> bool:
    """Whether `name` is a checkpoint directory's final name (not one still being written)."""
    return name.startswith(CHECKPOINT_PREFIX) and TEMP_MARKER not in name


def checkpoints_of(path: Path) -> Path:
    """The `checkpoints/` directory `path` names: a run directory's, or `path` itself."""
    return path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory checkpoint directory `checkpoint` sits in; None when it sits in none."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else None


def meta_path(checkpoint: Path) -> Path:
    """The meta record of checkpoint directory `checkpoint`."""
    return checkpoint / META_JSON
