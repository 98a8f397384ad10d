"""Issue 23, items 1, 2 and 5: `mtp export` / `mtp import` never delete or replace a run's
data, never copy a local file into a model, and a full disk exits 2 leaving the previous
output intact.

Real files, links, locks and (as root) a real 2 MiB tmpfs. Every refused command is checked
against a listing (path, type, size, mtime) of the whole test directory taken before it: nothing
outside `--out` (and for a refusal nothing at all) may be created, changed or removed.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from mtp_cli.checkpoint.run_dir import RunDir, RunDirLock
from mtp_cli.hf.export import export_checkpoint
from tests.ckpt_helpers import write_dcp_checkpoint
from tests.cli_helpers import run_mtp
from tests.hf_models import dense_sections, random_model

pytest.importorskip("transformers")
STEP_20 = "step_0000020"


def listing(root: Path) -> dict[str, tuple[str, int, int]]:
    """{relative path: (kind, size, mtime_ns)} of everything below `root`, links not followed."""
    out = {}
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        kind = "link" if stat.S_ISLNK(info.st_mode) else "dir" if path.is_dir() else "file"
        size = 0 if kind == "dir" else info.st_size
        out[str(path.relative_to(root))] = (kind, size, info.st_mtime_ns)
    return out


def but_its_mtime(entries: dict[str, tuple[str, int, int]]) -> dict[str, tuple[str, int, int]]:
    """A listing with the mtime of its root left out: the directory where the temporary
    output was created and removed again."""
    return {**entries, ".": entries["."][:2]}


def assert_one_line_refusal(result, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def trained_run(root: Path, seed: int) -> Path:
    """A run directory as `mtp train` leaves it: checkpoints 10 and 20, `latest`, metrics,
    and the `.lock` the launcher took (released)."""
    spec, model = random_model(dense_sections(), seed)
    for step in (10, 20):
        write_dcp_checkpoint(root, spec, step=step, model_state=model.state_dict())
    (root / "metrics.jsonl").write_text('{"step": 10}\n{"step": 20}\n')
    with RunDirLock(RunDir(root)):
        pass
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """runs/src and runs/victim (trained runs), hf (an export of src with tokenizer files)."""
    root = tmp_path_factory.mktemp("base")
    trained_run(root / "runs" / "src", 5)
    trained_run(root / "runs" / "victim", 6)
    export_checkpoint(root / "runs" / "src", root / "hf")
    return root


@pytest.fixture()
def world(base, tmp_path) -> Path:
    """A private copy of `base` (links kept as links)."""
    shutil.copytree(base, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


# --- item 1: nothing of a run is deleted or replaced ---------------------------------------

def _out_forms(w: Path) -> dict[str, Path]:
    victim = w / "runs" / "victim"
    (w / "to_checkpoints").symlink_to(victim / "checkpoints")
    shutil.copytree(victim, w / "holder" / "run", symlinks=True)
    return {"latest checkpoint": victim / "checkpoints" / STEP_20,
            "checkpoints": victim / "checkpoints",
            "the run directory": victim,
            "a directory holding a run": w / "holder",
            "dotted": victim / "checkpoints" / ".." / "checkpoints" / "." / STEP_20,
            "a link to checkpoints": w / "to_checkpoints"}


@pytest.mark.parametrize("form", ["latest checkpoint", "checkpoints", "the run directory",
                                  "a directory holding a run", "dotted",
                                  "a link to checkpoints"])
def test_export_over_a_run_directory_is_refused_leaving_it_whole(world, form):
    """Broken 1: `export --out R/checkpoints/step_0000020 --overwrite` replaced the latest
    checkpoint; `--out R/checkpoints` deleted every checkpoint."""
    out = _out_forms(world)[form]
    before = listing(world)
    result = run_mtp("export", str(world / "runs" / "src"), "--out", str(out), "--overwrite")
    assert_one_line_refusal(result, str(out), "--out")
    assert listing(world) == before


def test_export_of_a_run_into_its_own_checkpoint_is_refused(world):
    """Broken 1 as reported: the source run's own `latest` checkpoint as --out."""
    run = world / "runs" / "src"
    before = listing(world)
    result = run_mtp("export", str(run), "--out", str(run / "checkpoints" / STEP_20),
                     "--overwrite")
    assert_one_line_refusal(result, STEP_20)
    result = run_mtp("export", str(run / "checkpoints" / "step_0000010"), "--out",
                     str(run / "checkpoints"), "--overwrite")
    assert_one_line_refusal(result, "checkpoints")
    assert listing(world) == before


def test_import_overwrite_of_a_run_in_use_is_refused(world):
    """Broken 2: `import --overwrite` ignored the lock a running `mtp train` holds."""
    victim = world / "runs" / "victim"
    before = listing(world)
    with RunDirLock(RunDir(victim)):  # the lock `mtp train` holds for its whole job
        result = run_mtp("import", str(world / "hf"), "--out", str(victim), "--overwrite")
    assert_one_line_refusal(result, str(victim), "in use")
    after = listing(world)
    lock = str((victim / ".lock").relative_to(world))
    assert {k: v for k, v in after.items() if k != lock} == \
        {k: v for k, v in before.items() if k != lock}  # the holder wrote its pid there
    again = run_mtp("import", str(world / "hf"), "--out", str(victim), "--overwrite")
    assert again.returncode == 0, again.stderr  # no one holds it: the run is replaced
    assert sorted(p.name for p in (victim / "checkpoints").iterdir()) == ["latest",
                                                                          "step_0000000"]


def test_import_into_a_run_directory_or_holding_one_is_refused(world):
    victim = world / "runs" / "victim"
    before = listing(world)
    for out in (victim / "checkpoints" / "new", victim / "inner", world / "runs"):
        result = run_mtp("import", str(world / "hf"), "--out", str(out), "--overwrite")
        assert_one_line_refusal(result, str(out))
    assert listing(world) == before


@pytest.mark.parametrize("out", [".", "..", "here"])
def test_out_dot_dotdot_or_a_link_to_it_is_refused(world, out):
    """Weak: `--out . / .. / SYMLINK --overwrite` gave ValueError/EBUSY tracebacks and left
    a `*.tmp-*` directory in the working directory."""
    cwd = world / "scratch"
    cwd.mkdir()
    (cwd / "here").symlink_to(".")
    before = listing(world)
    for command in (("export", str(world / "runs" / "src")), ("import", str(world / "hf"))):
        result = run_mtp(*command, "--out", out, "--overwrite", cwd=cwd)
        assert_one_line_refusal(result, "current directory")
    assert listing(world) == before


def test_out_through_a_link_replaces_the_target_it_names(world):
    """Weak: `--out SYMLINK --overwrite` writes the directory the link names; the link stays
    and no `*.tmp-*` is left."""
    (world / "old").mkdir()
    (world / "old" / "stale.txt").write_text("x")
    (world / "link").symlink_to("old")
    result = run_mtp("export", str(world / "runs" / "src"), "--out", str(world / "link"),
                     "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (world / "link").is_symlink() and not (world / "old" / "stale.txt").exists()
    assert (world / "old" / "config.json").is_file()
    assert not [p for p in world.iterdir() if ".tmp-" in p.name]


def test_exported_shards_are_0644_even_under_umask_077(world):
    """Weak: exported safetensors shards were mode 0600 (fixed by issue 22's serving work:
    this pins it, under the strictest umask)."""
    umask = os.umask(0o077)
    try:
        result = run_mtp("export", str(world / "runs" / "src"), "--out", str(world / "x"),
                         "--shard-size", "100KB")
    finally:
        os.umask(umask)
    assert result.returncode == 0, result.stderr
    files = [p for p in (world / "x").rglob("*") if p.is_file()]
    assert sum(p.suffix == ".safetensors" for p in files) > 1
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o644)}


# --- item 1: a killed export's leftover ----------------------------------------------------

def _leftover(world: Path, target: Path, pid: int, tool: str = "mtp export") -> Path:
    import socket

    path = target.with_name(target.name + ".tmp-deadbeef")
    path.mkdir()
    (path / "model-00001-of-00001.safetensors").write_bytes(b"half")
    (path / ".mtp-staging.json").write_text(json.dumps(
        {"tool": tool, "target": str(target), "pid": pid, "host": socket.gethostname()}))
    return path


def test_only_provably_own_leftovers_are_removed(world):
    """A staging directory naming this target and a live writer, another target, or none (a
    user's `hf.tmp-notes`), is kept; the dead writer's one of this target goes."""
    out = world / "out"
    alive = _leftover(world, out, os.getpid())
    alive = alive.rename(out.with_name("out.tmp-alive0001"))
    other = _leftover(world, world / "elsewhere", 2**31 - 2)
    other = other.rename(out.with_name("out.tmp-other0001"))
    users = out.with_name("out.tmp-notes")
    users.mkdir()
    dead = _leftover(world, out, 2**31 - 2)  # no such process
    result = run_mtp("export", str(world / "runs" / "src"), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert not dead.exists() and alive.is_dir() and other.is_dir() and users.is_dir()
    assert any(note.startswith(f"removed {dead}") for note in json.loads(result.stdout)["notes"])


@pytest.mark.slow
def test_a_killed_exports_leftover_is_removed_by_the_next_export(world):
    """Weak: a killed export's `OUT.tmp-*` was never cleaned up by a later export."""
    import subprocess
    import sys

    out = world / "out"
    killer = ("import os, signal, sys\n"
              "from mtp_cli.hf import export\n"
              "write = export._write_shard\n"
              "def dying(*a, **k):\n"
              "    write(*a, **k)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "export._write_shard = dying\n"
              "export.export_checkpoint(sys.argv[1], sys.argv[2])\n")
    killed = subprocess.run([sys.executable, "-c", killer, str(world / "runs" / "src"),
                             str(out)], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    left = [p for p in world.iterdir() if p.name.startswith("out.tmp-")]
    assert len(left) == 1 and any(left[0].glob("*.safetensors"))
    result = run_mtp("export", str(world / "runs" / "src"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert not left[0].exists() and (out / "config.json").is_file()


# --- item 2: no local file leaves through a model ------------------------------------------

def _secret(world: Path) -> Path:
    secret = world / "secret.json"
    secret.write_text('{"api_token": "hf_SECRET", "tokenizer_class": "X"}')
    return secret


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json",
                                  "tokenizer.json"])
@pytest.mark.parametrize("target", ["/proc/self/environ", "secret", "outside tokenizer"])
def test_import_refuses_a_tokenizer_file_linking_out_of_the_model(world, name, target):
    """Broken 3: a tokenizer side file linked to /proc/self/environ (or any readable file)
    was copied into the run directory, then into the next export."""
    if target == "secret":
        link_to = _secret(world)
    elif target == "outside tokenizer":  # a real tokenizer, but not the model's
        link_to = world / "elsewhere.json"
        shutil.copyfile(world / "hf" / "tokenizer.json", link_to)
    else:
        link_to = Path(target)
    (world / "hf" / name).unlink(missing_ok=True)
    (world / "hf" / name).symlink_to(link_to)
    before = listing(world)
    result = run_mtp("import", str(world / "hf"), "--out", str(world / "run"))
    assert_one_line_refusal(result, str(world / "hf" / name), "outside")
    assert listing(world) == before


def test_export_refuses_a_linked_side_file_of_the_runs_tokenizer(world):
    """Broken 3, export half: a run whose tokenizer/ holds a linked side file."""
    assert run_mtp("import", str(world / "hf"), "--out", str(world / "run")).returncode == 0
    side = world / "run" / "tokenizer" / "tokenizer_config.json"
    side.unlink()
    side.symlink_to("/proc/self/environ")
    before = listing(world)
    result = run_mtp("export", str(world / "run"), "--out", str(world / "x"))
    assert_one_line_refusal(result, str(side), "outside")
    assert listing(world) == before


@pytest.mark.parametrize("name, content, needle", [
    ("tokenizer.json", '{"model": 3}', "not a tokenizer"),
    ("tokenizer.json", "[1, 2]", "no JSON object"),
    ("tokenizer_config.json", '{"eos_token": 7}', "eos_token"),
    ("tokenizer_config.json", '{"model_max_length": "big"}', "model_max_length"),
    ("special_tokens_map.json", "not json", "does not parse as JSON"),
    ("special_tokens_map.json", '{"additional_special_tokens": "x"}',
     "additional_special_tokens"),
])
def test_import_refuses_a_tokenizer_file_that_is_not_what_it_claims(world, name, content,
                                                                       needle):
    (world / "hf" / name).write_text(content)
    before = listing(world)
    result = run_mtp("import", str(world / "hf"), "--out", str(world / "run"))
    assert_one_line_refusal(result, name, needle)
    assert listing(world) == before


def test_import_refuses_a_huge_tokenizer_without_reading_it(world):
    """Weak: `import` copied a 3 GB tokenizer.json with no size limit (sparse here)."""
    with open(world / "hf" / "tokenizer.json", "r+b") as handle:
        handle.truncate(3 * 10**9)
    before = listing(world)
    result = run_mtp("import", str(world / "hf"), "--out", str(world / "run"))
    assert_one_line_refusal(result, "tokenizer.json", "3000000000 bytes")
    assert listing(world) == before


def test_links_inside_the_model_and_a_hub_snapshot_are_copied(world):
    """What a link may do: stay inside the directory, or be a hub snapshot's link into the
    `blobs/` beside it (every file of a downloaded model is one)."""
    hub = world / "models--x" / "snapshots" / "abc"
    blobs = world / "models--x" / "blobs"
    shutil.copytree(world / "hf", hub)
    blobs.mkdir()
    os.replace(hub / "tokenizer.json", blobs / "0123")
    (hub / "tokenizer.json").symlink_to("../../blobs/0123")
    (hub / "sub").mkdir()
    os.replace(hub / "tokenizer_config.json", hub / "sub" / "tc.json")
    (hub / "tokenizer_config.json").symlink_to("sub/tc.json")
    result = run_mtp("import", str(hub), "--out", str(world / "run"))
    assert result.returncode == 0, result.stderr
    kept = world / "run" / "tokenizer"
    assert (kept / "tokenizer.json").read_bytes() == (blobs / "0123").read_bytes()
    assert (kept / "tokenizer_config.json").read_bytes() == \
        (hub / "sub" / "tc.json").read_bytes()
    assert not (kept / "tokenizer.json").is_symlink()


# --- item 5: a full disk ---------------------------------------------------------------------

@pytest.fixture()
def small_disk(tmp_path):
    """A real 2 MiB tmpfs mounted at tmp_path/disk (root only; skipped with the reason)."""
    target = tmp_path / "disk"
    target.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", str(target).encode(), b"tmpfs", 0, b"size=2m") != 0:
        reason = os.strerror(ctypes.get_errno())
        pytest.skip(f"cannot mount a tmpfs here ({reason}; uid {os.getuid()}): needs root")
    try:
        yield target
    finally:
        libc.umount2(str(target).encode(), 2)  # MNT_DETACH


def _fill(disk: Path, leave: int) -> None:
    """Fill `disk` until `leave` bytes remain free."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as handle:
        handle.write(b"\0" * max(free - leave, 0))


def test_export_on_a_full_disk_exits_2_and_keeps_the_previous_output(world, small_disk):
    """Weak: a full disk during `export` gave a traceback."""
    out = small_disk / "hf"
    first = run_mtp("export", str(world / "runs" / "src"), "--out", str(out))
    assert first.returncode == 0, first.stderr
    _fill(small_disk, 64 * 1024)
    before = listing(small_disk)
    result = run_mtp("export", str(world / "runs" / "src"), "--out", str(out), "--overwrite")
    line = assert_one_line_refusal(result, str(out), "No space left on device",
                                   "intact", "removed")
    assert "files (" in line
    assert but_its_mtime(listing(small_disk)) == but_its_mtime(before)


def test_import_on_a_full_disk_exits_2_and_creates_nothing(world, small_disk):
    """Weak: a full disk during `import` gave a traceback."""
    _fill(small_disk, 64 * 1024)
    before = listing(small_disk)
    result = run_mtp("import", str(world / "hf"), "--out", str(small_disk / "run"))
    assert_one_line_refusal(result, str(small_disk / "run"), "No space left on device",
                            "was not created")
    assert but_its_mtime(listing(small_disk)) == but_its_mtime(before)


def test_a_file_size_limit_fault_exits_2_naming_it(world):
    """Another I/O fault than a full disk, with no root needed: the file size limit
    (`RLIMIT_FSIZE`, EFBIG; Python ignores SIGXFSZ) stops the shard mid-write."""
    import resource

    out = world / "hf_again"
    before = listing(world)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        result = run_mtp("export", str(world / "runs" / "src"), "--out", str(out))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert_one_line_refusal(result, str(out), "File too large", "was not created")
    assert but_its_mtime(listing(world)) == but_its_mtime(before)
