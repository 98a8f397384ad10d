"""Checkpoint reading and MTP structure/tie checks for `mtp inspect-ckpt`.

    from mtp_cli.inspect import inspect_checkpoint
    report = inspect_checkpoint("runs/tiny")        # run dir, DCP dir or torch.save file
    report.passed, [c.as_dict() for c in report.checks]
"""

from mtp_cli.inspect.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from mtp_cli.inspect.checks import Check
from mtp_cli.inspect.inspection import CheckpointInspection, inspect_checkpoint

__all__ = ["Check", "Checkpoint", "CheckpointInspection", "TensorInfo", "inspect_checkpoint",
           "open_checkpoint"]
