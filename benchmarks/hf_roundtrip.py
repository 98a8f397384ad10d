"""`mtp export` and `mtp import` of specs/llama_125m.yaml (~132M parameters with its MTP
depth, fp32): wall time and peak memory, each command in a fresh process.

Issue 15's bound: both stream, so peak memory above the baseline (a fresh process that imports
the same modules and does nothing) is at most the largest output shard plus twice the largest
tensor, whatever the model size. Export runs at `--shard-size 100MB` (several shards, each one
DCP read) and at the default 5GB (one shard); the import reads the 100MB export back. The setup
(a random model saved as the run directory `mtp train` would write) is not measured.
Run: `python benchmarks/hf_roundtrip.py [--keep DIR]`.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "llama_125m.yaml"
MIB = 2**20

# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork + exec, so a child's would include
# this (setup-sized) process; VmHWM belongs to the new program's own address space.
CHILD = """
import sys
from mtp_cli.cli import app
import mtp_cli.hf.export, mtp_cli.hf.importer, safetensors.torch
import mtp_cli.inspect.checkpoint, mtp_cli.builders.model_builder, mtp_cli.data.tokenizer
if sys.argv[1:]:
    try:
        app(sys.argv[1:])
    except SystemExit as done:
        assert not done.code, done.code
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(int(hwm.split()[1]), file=sys.stderr)
"""


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(*args: str) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of `mtp ARGS` in a fresh process (no args: imports only)."""
    start, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"mtp {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    peak = int(done.stderr.strip().splitlines()[-1]) * 1024 / MIB  # VmHWM is in kB
    return time.perf_counter() - start, _children_cpu() - cpu, peak


def make_run_dir(root: Path) -> tuple[Path, float]:
    """A random llama_125m model as `mtp train` stores it (DCP + meta.json); largest tensor."""
    import torch.distributed.checkpoint as dcp

    from mtp_cli import build_model, load_spec
    from mtp_cli.checkpoint.meta import write_meta
    from mtp_cli.checkpoint.run_dir import RunDir, checkpoint_name
    from mtp_cli.hf.step0_checkpoint import step0_meta, training_state

    spec = load_spec(SPEC)
    state = build_model(spec).state_dict()
    largest = max(t.numel() * t.element_size() for t in state.values()) / MIB
    run_dir = root / "run"
    directory = RunDir(run_dir).checkpoints / checkpoint_name(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state, **training_state(spec)}, checkpoint_id=directory,
                 no_dist=True)
    write_meta(directory, step0_meta(spec, {}))
    RunDir(run_dir).point_latest(directory.name)
    return run_dir, largest


def largest_file(directory: Path, pattern: str) -> float:
    return max(p.stat().st_size for p in directory.glob(pattern)) / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="hf_roundtrip_"))
    root.mkdir(parents=True, exist_ok=True)
    run_dir, largest_tensor = make_run_dir(root)
    checkpoint_mib = sum(p.stat().st_size for p in run_dir.rglob("*.distcp")) / MIB
    base_wall, base_cpu, base_peak = run()
    print(f"model: {SPEC.relative_to(ROOT)}, checkpoint {checkpoint_mib:.0f} MiB, largest tensor "
          f"{largest_tensor:.0f} MiB")
    print(f"baseline (fresh process importing the same modules): {base_wall:.2f} s wall, "
          f"{base_cpu:.2f} s CPU, {base_peak:.0f} MiB peak")
    print(f"{'command':34} {'wall s':>7} {'cpu s':>6} {'x base':>7} {'peak MiB':>9} "
          f"{'above':>7} {'bound':>7}  verdict")
    steps = [
        ("export --shard-size 100MB", ["export", str(run_dir), "--out", str(root / "hf100"),
                                       "--shard-size", "100MB", "--overwrite"], "hf100"),
        ("export (default 5GB shards)", ["export", str(run_dir), "--out", str(root / "hf5g"),
                                         "--overwrite"], "hf5g"),
        ("import of the 100MB export", ["import", str(root / "hf100"), "--out",
                                        str(root / "imported"), "--overwrite"], "hf100"),
    ]
    for label, argv, shards in steps:
        wall, cpu, peak = run(*argv)
        bound = largest_file(root / shards, "*.safetensors") + 2 * largest_tensor
        above = peak - base_peak
        verdict = "ok" if above <= bound else "MISSED"
        print(f"{label:34} {wall:7.2f} {cpu:6.2f} {wall / base_wall:7.2f} {peak:9.0f} "
              f"{above:7.0f} {bound:7.0f}  {verdict}")
    print(f"(bound: largest output shard + 2 x largest tensor, MiB; work dir {root})")


if __name__ == "__main__":
    main()
