"""The worker entry point: `python -m mtp_cli.launch.worker --run-dir DIR --spec JSON`.

The launcher (`mtp train`) starts one of these per device through torch.distributed's elastic
agent (forked, `forked_main`, or in its own interpreter, `main`: see `launch/start.py`), with the resolved spec as JSON (so a restart never rereads an edited spec file).
A `UserError` exits 2 with its message; a deliberate stop (a non-finite step, a full disk) is
reported as `train.stops` describes; anything else is recorded by torchelastic's `record` so the
launcher can show the failing rank's traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from mtp_cli.errors import UserError
from mtp_cli.launch.distributed import distributed, exit_with_launcher
from mtp_cli.launch.interrupt import exit_quietly_on_sigint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mtp_cli.launch.worker")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--spec", required=True, help="the resolved RunSpec as JSON")
    parser.add_argument("--allow-imports", action="store_true")
    return parser.parse_args(argv)


@record
def main(argv: list[str] | None = None) -> int:
    exit_with_launcher()
    exit_quietly_on_sigint()
    args = parse_args(argv)
    from mtp_cli.checkpoint.run_dir import RunDir
    from mtp_cli.config.loader import load_spec
    from mtp_cli.launch.faults import EnvFaults
    from mtp_cli.train.stops import TrainingStopped, report_stop
    from mtp_cli.train.trainer import Trainer

    run_dir, rank = RunDir(Path(args.run_dir)), None
    try:
        spec = load_spec(json.loads(args.spec), allow_imports=args.allow_imports)
        with distributed() as env:
            rank = env.rank
            Trainer(spec, run_dir, env, allow_imports=args.allow_imports,
                    faults=EnvFaults()).run()
    except TrainingStopped as stop:
        return report_stop(stop, run_dir, is_main=rank == 0)
    except UserError as error:
        for line in error.render().splitlines():
            print(f"error: {line}", file=sys.stderr, flush=True)
        return 2
    return 0


def forked_main(argv: list[str]) -> None:
    """The worker forked from the launcher (`launch/start.py`): undo what the fork carried over
    from the launcher, then run `main`; a non-zero code becomes the process's exit code."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not torchelastic's launcher-side handler
    for stream in (sys.stdout, sys.stderr):  # as `python -u` runs an exec'd worker
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True, write_through=True)
    threads = os.environ.get("OMP_NUM_THREADS")  # set by the launcher after torch was imported
    if threads and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    code = main(argv)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    sys.exit(main())
