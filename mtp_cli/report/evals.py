"""The newest `mtp eval` result of a run directory (`RUN_DIR/eval/step_NNNNNNN.json`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mtp_cli.errors import UserError

EVAL_DIR = "eval"
EVAL_JSON_LIMIT = 4 * 2**20


def latest_eval(run_dir: Path, warnings: list[str] | None = None) -> dict[str, Any] | None:
    """The eval of the highest step that reads as a JSON object (None when there is none);
    unreadable files are skipped, with a warning appended to `warnings`."""
    from mtp_cli.checkpoint.files import read_json_object
    from mtp_cli.checkpoint.layout import checkpoint_step

    directory = Path(run_dir) / EVAL_DIR
    if not directory.is_dir():
        return None
    found = []
    for path in directory.iterdir():
        step = checkpoint_step(path.stem) if path.suffix == ".json" else None
        if step is not None:
            found.append((step, path))
    for _, path in sorted(found, reverse=True):
        try:
            return read_json_object(path, EVAL_JSON_LIMIT)
        except UserError as error:
            if warnings is not None:
                warnings.append(f"skipped {path}: {error}")
    return None
