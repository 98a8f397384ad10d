"""How the workers start: forked from the launcher, or each in a fresh interpreter.

A fresh interpreter (`exec`, torchrun's `--module` launch) imports torch, torch.distributed's
checkpoint and tensor packages and the training code again in every worker: about 4 s of CPU
each, so on a CPU node a 4-worker launch spends most of its start-up importing the same modules
four times. Forking from the launcher (`fork`), after the launcher has imported them once,
starts each worker in milliseconds. Both go through torch.distributed's elastic agent
(`elastic_launch`), with the same rendezvous, restarts and failure records.

`auto` forks where the workers run on the CPU and execs where a CUDA device is visible: a CUDA
driver initialised before a fork is unusable in the child, and a launcher on a GPU node is best
kept out of that question entirely (torchrun never forks for a module either).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import uuid

START_METHODS = ("auto", "fork", "exec")

# Imported by the launcher before it forks, so that no worker imports them again: the worker's
# training path, and torch._dynamo, which torch imports lazily on the first optimizer step or
# parameter initialisation (~0.6 s).
PRELOAD = ("mtp_cli.launch.worker", "mtp_cli.train.trainer", "torch._dynamo")


def resolve_start_method(requested: str) -> str:
    """`fork` or `exec` for `--start-method` (`auto`: fork unless CUDA devices are visible).

    `torch.cuda.device_count()` asks NVML first, which leaves the CUDA driver uninitialised."""
    if requested != "auto":
        return requested
    import torch

    if not hasattr(os, "fork") or sys.platform == "darwin":
        return "exec"  # Windows has no fork; macOS's system frameworks are not fork-safe
    return "exec" if torch.cuda.device_count() > 0 else "fork"


def run_elastic(torchrun_argv: list[str], worker_module: str, method: str) -> None:
    """Run torch.distributed.run with `torchrun_argv` in this process, starting the workers
    by `method`. Raises what the elastic agent raises (ChildFailedError, SignalException)."""
    from torch.distributed.run import config_from_args, parse_args, run

    args = parse_args(torchrun_argv)
    _name_rendezvous_events_cheaply()
    if method == "exec":
        run(args)
        return
    from torch.distributed.launcher.api import elastic_launch

    from mtp_cli.launch.worker import forked_main

    _standalone_rendezvous(args)
    config, _, command = config_from_args(args)
    config.start_method = "fork"
    worker_argv = command[command.index(worker_module) + 1:]
    for module in PRELOAD:
        importlib.import_module(module)
    elastic_launch(config, entrypoint=forked_main)(worker_argv)


def _standalone_rendezvous(args: argparse.Namespace) -> None:
    """What `torch.distributed.run.run` does for `--standalone` before it builds its config
    (a c10d rendezvous on a free local port); `run` itself only launches a command line."""
    if args.standalone:
        args.rdzv_backend = "c10d"
        args.rdzv_endpoint = "localhost:0"
        args.rdzv_id = str(uuid.uuid4())


def _name_rendezvous_events_cheaply() -> None:
    """torch's dynamic rendezvous names the method recording each of its events with
    `inspect.stack()`, which reads every frame's source and matches it against every loaded
    module: about 1.7 s of CPU per launch once the training code is loaded (nine events, two
    stacks each), on a launch that otherwise takes a few seconds. Give it the same name, read
    from the frame itself. Left alone if torch's private helper has changed."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    if callable(getattr(dynamic_rendezvous, "get_method_name", None)):
        dynamic_rendezvous.get_method_name = frame_function_name


def frame_function_name(depth: int = 2) -> str:
    """The function `depth` frames up from this one (`inspect.stack()[depth].function`)."""
    try:
        return sys._getframe(depth).f_code.co_name
    except ValueError:  # a shallower stack
        return "no_method_name"
