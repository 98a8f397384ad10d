"""Snapshot what the CLI does on the tiny spec, to prove a refactor changed no behaviour.

Run it on the code before a refactor and on the code after, then `--diff` the two snapshot
directories: any difference in printed output, exit codes, losses, gradient norms, validation
losses, checkpoint contents, exported tensors, generated text or eval results shows as a
unified diff (exit 1); "identical" (exit 0) means the refactor is behaviour-preserving on this
path, bit for bit.

    python3 benchmarks/behaviour_snapshot.py --python-path /path/to/old-worktree --out /tmp/a
    python3 benchmarks/behaviour_snapshot.py --python-path /path/to/new-worktree --out /tmp/b
    python3 benchmarks/behaviour_snapshot.py --diff /tmp/a /tmp/b

In a fresh temporary working area it runs, each as `python3 -m mtp_cli ...` (cwd = the
worktree, PYTHONPATH = the worktree when --python-path is given; OMP_NUM_THREADS=1,
PYTHONHASHSEED=0, COLUMNS=200 so rich never wraps or truncates): `build` (plain and
`--memory`), a 20-step `train` (checkpoints every 5 steps with keep_last 2, so pruning runs;
validation every 10 steps), `inspect-ckpt`, `report`, `export`, `import` of the export,
greedy `generate` and `eval --tokens 2048`. About 1 minute on 2 CPU cores.

Saved into --out:
  cmd_NN_<name>.txt     the command line, exit code, stdout and stderr (separately: forked
                        workers share the pipes, so an interleaving of the two is not fixed)
  files/<path>          every text file produced (metrics.jsonl, meta.json, eval json,
                        config.json, spec.yaml, tokenizer ...), normalised
  listing.txt           every file produced: relative path and size (or what it holds
                        instead, where the bytes vary)
  tensors.txt           sha256 of every DCP shard (whole file and per stored entry, from
                        the shard's byte ranges in `.metadata`), a dump of each `.metadata`,
                        and sha256 of every safetensors file and of each tensor's bytes in it
  tensorboard.txt       every scalar tag with its (step, value) pairs

Determinism (checked by running this twice on the same code and diffing): training, DCP
shard files (`__0_0.distcp`, including the RNG state), safetensors files, generated text and
eval numbers are bit-identical run to run. What is masked, and why:
  - time/machine fields: printed tok/s, eta, "in N s" durations, speed-up, the report's mean
    tokens/s and peak memory; metrics.jsonl `time`, `tokens_per_s`, `peak_memory_mb`;
    meta.json `created` and `mtp_cli_version`; eval json `time`, `seconds` and `*_seconds`;
    TensorBoard wall times and the `tokens-per-second` values; the event file's name
    (timestamp, host, pid)
  - `.lock` (holds the launcher's pid)
  - DCP `.metadata`: genuinely differs run to run in `storage_meta` only (`checkpoint_id` is
    the random `step_NNNNNNN.tmp-<hex>` directory it was written in, `save_id` a fresh
    uuid4), so it is recorded as a dump with those two masked, not as a hash
  - PNG plots: only their existence and a size class (power-of-two bucket), not the bytes
  - absolute paths: the temporary root becomes <TMP>, the worktree <REPO>
Losses, grad norms, learning rates and acceptance rates are kept exactly (JSON floats
round-trip through repr).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCRIPT_REPO = Path(__file__).resolve().parents[1]
SPEC = "specs/tiny.yaml"
MASK = "<MASKED>"

TRAIN_OVERRIDES = [
    "train.steps=20",
    "train.warmup_steps=5",
    "train.eval_interval=10",
    "train.eval_steps=1",
    "checkpoint.interval=5",
    "checkpoint.keep_last=2",
]

# Printed numbers that depend on the machine's speed or load, not on the code's behaviour.
OUTPUT_MASKS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"[\d.,]+k? tok/s"), f"{MASK} tok/s"),
    (re.compile(r"[\d.e+-]+ TFLOP/s( \(MFU [\d.]+%\))?"), f"{MASK} TFLOP/s"),
    (re.compile(r"\beta \d+m\d+s"), f"eta {MASK}"),
    (re.compile(r"\bin \d+(?:\.\d+)? ?s\b"), f"in {MASK}s"),
    (re.compile(r"speed-up \d+(?:\.\d+)?x"), f"speed-up {MASK}x"),
    (re.compile(r"tokens/s \(mean last 10%\) [\d.,]+"), f"tokens/s (mean last 10%) {MASK}"),
    (re.compile(r"peak memory [\d.,]+ ?[KMG]i?B"), f"peak memory {MASK}"),
]
# Lines a cold cache prints once per machine.
DROP_LINES = re.compile(r"^Matplotlib is building the font cache")

# JSON keys whose values are wall-clock or machine measurements.
JSON_MASK_KEYS = frozenset(
    {"time", "tokens_per_s", "peak_memory_mb", "tflops_per_device", "mfu", "created",
     "mtp_cli_version", "seconds"}
)
TB_MASK_TAGS = frozenset({"tokens-per-second", "throughput-tflops-per-device", "mfu"})
TEXT_SUFFIXES = frozenset({".json", ".jsonl", ".yaml", ".yml", ".txt", ".md", ""})


class Normaliser:
    """Replaces the temporary root and the worktree by placeholders, masks timings."""

    def __init__(self, tmp_root: Path, repo: Path) -> None:
        pairs: list[tuple[str, str]] = []
        for path, name in ((tmp_root, "<TMP>"), (repo, "<REPO>")):
            for variant in {str(path), str(path.resolve())}:
                pairs.append((variant, name))
        # Longest first, so a path inside another is replaced whole.
        self.pairs = sorted(pairs, key=lambda p: len(p[0]), reverse=True)

    def paths(self, text: str) -> str:
        for old, new in self.pairs:
            text = text.replace(old, new)
        return text

    def output(self, text: str) -> str:
        text = self.paths(text)
        for pattern, repl in OUTPUT_MASKS:
            text = pattern.sub(repl, text)
        return "".join(
            line for line in text.splitlines(keepends=True) if not DROP_LINES.match(line)
        )


def mask_json(value: Any) -> Any:
    """`value` with every timing/machine field replaced by MASK (key order kept)."""
    if isinstance(value, dict):
        return {
            k: MASK if (k in JSON_MASK_KEYS or k.endswith("_seconds")) else mask_json(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [mask_json(v) for v in value]
    return value


def json_layout(raw: str, obj: Any) -> str:
    """How a JSON file is laid out, so a formatting change shows although values are re-dumped."""
    for indent in (None, 1, 2, 4):
        for ensure_ascii in (True, False):
            dumped = json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii)
            if raw == dumped:
                return f"indent={indent}"
            if raw == dumped + "\n":
                return f"indent={indent}, trailing newline"
    return "layout: other"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def size_class(size: int) -> str:
    if size == 0:
        return "empty"
    low = 1 << (size.bit_length() - 1)
    return f"{low}..{2 * low - 1} bytes"


# ---------------------------------------------------------------------------------------------
# Running the CLI


def run_cli(
    name: str,
    args: list[str],
    *,
    index: int,
    repo: Path,
    python_path: Path | None,
    norm: Normaliser,
    out: Path,
) -> tuple[int, float]:
    env = dict(os.environ)
    for key in ("FORCE_COLOR", "CLICOLOR_FORCE", "PYTHONSTARTUP"):
        env.pop(key, None)
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONHASHSEED="0",
        PYTHONIOENCODING="utf-8",
        COLUMNS="200",
        LINES="50",
        NO_COLOR="1",
        TERM="dumb",
        TZ="UTC",
    )
    if python_path is not None:
        env["PYTHONPATH"] = str(python_path)
    cmd = [sys.executable, "-m", "mtp_cli", *args]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=repo,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        check=False,
    )
    elapsed = time.perf_counter() - start
    shown = " ".join(["python3 -m mtp_cli", *(_quote(a) for a in args)])
    body = (
        f"$ {norm.paths(shown)}\n"
        f"exit code: {proc.returncode}\n"
        f"--- stdout\n{norm.output(proc.stdout)}"
        f"--- stderr\n{norm.output(proc.stderr)}"
    )
    (out / f"cmd_{index:02d}_{name}.txt").write_text(body, encoding="utf-8")
    return proc.returncode, elapsed


def _quote(arg: str) -> str:
    return repr(arg) if (not arg or any(c in arg for c in " '\"$")) else arg


# ---------------------------------------------------------------------------------------------
# Files produced


def dcp_metadata_dump(path: Path, rel: str, norm: Normaliser) -> list[str]:
    """The `.metadata` of a DCP checkpoint as text, with its per-save fields masked, and the
    sha256 of every stored entry's bytes in its shard."""
    # Our own freshly written file: a plain unpickle (needs torch's DCP classes importable).
    import torch.distributed.checkpoint  # noqa: F401

    with path.open("rb") as f:
        meta = pickle.load(f)
    lines = [f"== {rel}", f"version: {getattr(meta, 'version', None)!r}"]
    storage_meta = getattr(meta, "storage_meta", None)
    if storage_meta is not None:
        lines.append(
            "storage_meta: checkpoint_id <MASKED> (its .tmp-<random> directory), "
            f"save_id <MASKED> (uuid4), load_id {storage_meta.load_id!r}, "
            f"modules {storage_meta.modules!r}"
        )
    lines.append("state_dict_metadata (stored order):")
    for fqn, item in meta.state_dict_metadata.items():
        if hasattr(item, "chunks"):
            props = item.properties
            chunks = ", ".join(f"{list(c.offsets)}+{list(c.sizes)}" for c in item.chunks)
            lines.append(
                f"  {fqn}: tensor {props.dtype} {list(item.size)} "
                f"layout={props.layout} chunks=[{chunks}]"
            )
        else:
            lines.append(f"  {fqn}: {type(item).__name__}")
    lines.append(f"planner_data: {norm.paths(repr(meta.planner_data))}")
    lines.append("storage layout (stored order): entry -> file @ offset + length")
    blobs: dict[str, bytes] = {}
    entries: list[str] = []
    for index, info in meta.storage_data.items():
        key = f"{index.fqn} offset={index.offset} index={index.index}"
        lines.append(f"  {key} -> {info.relative_path} @ {info.offset} + {info.length}")
        shard = path.parent / info.relative_path
        if info.relative_path not in blobs:
            blobs[info.relative_path] = shard.read_bytes()
        data = blobs[info.relative_path][info.offset : info.offset + info.length]
        entries.append(f"  {key}: {len(data)} bytes sha256 {sha256(data)}")
    lines.append("entry bytes (by name):")
    lines.extend(sorted(entries))
    return lines


def safetensors_dump(path: Path, rel: str) -> list[str]:
    """sha256 of the file and of every tensor's bytes (read from the header, stdlib only)."""
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    base = 8 + header_len
    lines = [f"== {rel}", f"file sha256 {sha256(raw)}"]
    lines.append(f"__metadata__: {json.dumps(header.pop('__metadata__', None))}")
    for name in sorted(header):
        t = header[name]
        start, end = t["data_offsets"]
        lines.append(
            f"  {name}: {t['dtype']} {t['shape']} sha256 {sha256(raw[base + start : base + end])}"
        )
    return lines


def tensorboard_dump(path: Path, rel_dir: str) -> list[str]:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return [f"== {rel_dir}: tensorboard not installed, skipped"]
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    lines = [f"== {rel_dir}/<events file>"]
    for tag in sorted(acc.Tags()["scalars"]):
        events = acc.Scalars(tag)
        if tag in TB_MASK_TAGS:
            steps = [e.step for e in events]
            lines.append(f"  {tag}: steps {steps}, values {MASK}")
        else:
            lines.append(f"  {tag}: {[(e.step, e.value) for e in events]!r}")
    return lines


def is_text(path: Path) -> bool:
    if path.suffix not in TEXT_SUFFIXES or path.stat().st_size > 4 << 20:
        return False
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return b"\0" not in data


def record_files(area: Path, out: Path, norm: Normaliser) -> None:
    listing: list[str] = []
    tensors: list[str] = []
    tboard: list[str] = []
    files_dir = out / "files"
    for path in sorted(p for p in area.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(area).as_posix()
        size = path.stat().st_size
        name = path.name
        if name.startswith("events.out.tfevents."):
            rel_dir = path.parent.relative_to(area).as_posix()
            listing.append(
                f"{rel_dir}/events.out.tfevents.{MASK}  size {MASK} "
                "(wall times; scalars in tensorboard.txt)"
            )
            tboard.extend(tensorboard_dump(path, rel_dir))
        elif name == ".lock":
            listing.append(f"{rel}  size {MASK} (holds the launcher's pid)")
        elif name == ".metadata":
            listing.append(f"{rel}  size {MASK} (per-save path and uuid; dump in tensors.txt)")
            tensors.extend(dcp_metadata_dump(path, rel, norm))
        elif path.suffix == ".distcp":
            listing.append(f"{rel}  {size} bytes")
            tensors.append(f"== {rel}: sha256 {sha256(path.read_bytes())}")
        elif path.suffix == ".safetensors":
            listing.append(f"{rel}  {size} bytes")
            tensors.extend(safetensors_dump(path, rel))
        elif path.suffix == ".png":
            ok = path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            listing.append(f"{rel}  png={'yes' if ok else 'NO'}, size class {size_class(size)}")
        elif is_text(path):
            raw = path.read_text(encoding="utf-8")
            text, note = normalise_text_file(path, norm.paths(raw))
            dest = files_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text, encoding="utf-8")
            if text == raw:
                listing.append(f"{rel}  {size} bytes")
            else:
                listing.append(f"{rel}  normalised {len(text.encode())} bytes{note}")
        else:
            listing.append(f"{rel}  {size} bytes, sha256 {sha256(path.read_bytes())}")
    (out / "listing.txt").write_text("\n".join(listing) + "\n", encoding="utf-8")
    (out / "tensors.txt").write_text("\n".join(tensors) + "\n", encoding="utf-8")
    (out / "tensorboard.txt").write_text("\n".join(tboard) + "\n", encoding="utf-8")


def normalise_text_file(path: Path, text: str) -> tuple[str, str]:
    """`text` (paths already replaced) with timing fields masked; and a note for the listing."""
    if path.suffix == ".jsonl":
        lines = []
        for line in text.splitlines():
            try:
                lines.append(json.dumps(mask_json(json.loads(line))))
            except json.JSONDecodeError:
                lines.append(line)
        return "\n".join(lines) + ("\n" if text.endswith("\n") else ""), ""
    if path.suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return text, ""
        masked = mask_json(obj)
        if masked == obj:
            return text, ""
        return json.dumps(masked, indent=2) + "\n", f" (source {json_layout(text, obj)})"
    return text, ""


# ---------------------------------------------------------------------------------------------
# Snapshot and diff


def snapshot(out: Path, python_path: Path | None, keep: bool) -> int:
    repo = (python_path or SCRIPT_REPO).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    area = Path(tempfile.mkdtemp(prefix="mtp-snap-"))
    norm = Normaliser(area, repo)
    run_dir, export, imported = area / "run", area / "export", area / "imported"
    commands: list[tuple[str, list[str]]] = [
        ("build", ["build", SPEC]),
        ("build_memory", ["build", SPEC, "--memory"]),
        ("train", ["train", SPEC, *TRAIN_OVERRIDES, "--run-dir", str(run_dir)]),
        ("inspect_ckpt", ["inspect-ckpt", str(run_dir)]),
        ("report", ["report", str(run_dir)]),
        ("export", ["export", str(run_dir), "--out", str(export)]),
        ("import", ["import", str(export), "--out", str(imported)]),
        (
            "generate",
            ["generate", str(run_dir), "--prompt", "def main", "--max-new-tokens", "24"],
        ),
        ("eval", ["eval", str(run_dir), "--tokens", "2048"]),
    ]
    total = time.perf_counter()
    failed = 0
    try:
        for index, (name, args) in enumerate(commands, 1):
            rc, elapsed = run_cli(
                name, args, index=index, repo=repo, python_path=python_path, norm=norm, out=out
            )
            failed += rc != 0
            print(f"{name:<14} exit {rc}  {elapsed:6.1f} s", flush=True)
        record_files(area, out, norm)
    finally:
        if keep:
            print(f"kept the working area {area}")
        else:
            shutil.rmtree(area, ignore_errors=True)
    print(f"snapshot of {repo} in {out}: {time.perf_counter() - total:.1f} s", flush=True)
    if failed:
        print(f"note: {failed} command(s) exited non-zero (recorded in the snapshot)")
    return 0


def diff(before: Path, after: Path) -> int:
    for d in (before, after):
        if not d.is_dir():
            print(f"not a directory: {d}", file=sys.stderr)
            return 2

    def files(root: Path) -> set[str]:
        return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}

    a_files, b_files = files(before), files(after)
    differences = 0
    for rel in sorted(a_files | b_files):
        if rel not in a_files or rel not in b_files:
            print(f"only in {before if rel in a_files else after}: {rel}")
            differences += 1
            continue
        a = (before / rel).read_text(encoding="utf-8").splitlines(keepends=True)
        b = (after / rel).read_text(encoding="utf-8").splitlines(keepends=True)
        if a != b:
            differences += 1
            sys.stdout.writelines(
                difflib.unified_diff(a, b, f"{before.name}/{rel}", f"{after.name}/{rel}")
            )
            if not b[-1:] or not b[-1].endswith("\n"):
                print()
    if differences:
        print(f"{differences} file(s) differ")
        return 1
    print("identical")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, help="Snapshot directory to write (replaced).")
    parser.add_argument(
        "--python-path",
        type=Path,
        help="Worktree whose mtp_cli runs (PYTHONPATH and cwd); default: this repository "
        "with the installed mtp_cli.",
    )
    parser.add_argument(
        "--keep", action="store_true", help="Keep the temporary working area (printed)."
    )
    parser.add_argument(
        "--diff",
        nargs=2,
        type=Path,
        metavar=("BEFORE", "AFTER"),
        help="Compare two snapshot directories; exit 1 on any difference.",
    )
    args = parser.parse_args(argv)
    if args.diff:
        return diff(*args.diff)
    if args.out is None:
        parser.error("--out is required (or --diff BEFORE AFTER)")
    return snapshot(args.out, args.python_path, args.keep)


if __name__ == "__main__":
    sys.exit(main())
