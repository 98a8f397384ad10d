"""`mtp train` refuses what would fail later, before it takes the lock or creates anything: a
symlinked lock file, bad rendezvous flags, a backend whose library is missing, run-directory
entries of the wrong type or without write permission."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtp_cli.checkpoint.run_dir import RunDir, RunDirLock
from mtp_cli.errors import UserError
from mtp_cli.launch.checks import check_backend, check_rendezvous, check_run_dir_entries
from mtp_cli.launch.launcher import LaunchOptions, check_options
from mtp_cli.launch.start import frame_function_name, resolve_start_method
from tests.hostile_helpers import assert_refused, run_bounded, tree
from tests.train_helpers import TINY, make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def train(run_dir: Path, corpus: Path, *args: str):
    overrides = [a for a in args if "=" in a and not a.startswith("--")]
    flags = [a for a in args if a not in overrides]
    return run_bounded("train", "specs/tiny.yaml", *TINY, f"data.path={corpus}", *overrides,
                       "--run-dir", str(run_dir), *flags)


@contextlib.contextmanager
def read_only_directory(path: Path) -> Iterator[None]:
    """`path` made unwritable: mode 0555, and for root (whom modes do not stop) the immutable
    attribute; skips the test where neither takes effect."""
    os.chmod(path, 0o555)
    immutable = False
    try:
        if os.access(path, os.W_OK):
            chattr = shutil.which("chattr")
            if chattr is None or subprocess.run([chattr, "+i", str(path)],
                                                capture_output=True).returncode:
                pytest.skip("cannot make a directory unwritable for this user")
            immutable = True
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        os.chmod(path, 0o755)


# --- the lock file ---------------------------------------------------------------------------
def test_lock_refuses_a_symlink_and_leaves_its_target_alone(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("my notes\n")
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.lock_file.symlink_to(victim)
    with pytest.raises(UserError, match="is a symbolic link"):
        RunDirLock(run).acquire()
    with pytest.raises(UserError, match="is a symbolic link"):
        RunDirLock(run, shared=True).acquire()
    assert victim.read_text() == "my notes\n"


def test_lock_refuses_a_fifo_without_hanging(tmp_path):
    run = RunDir(tmp_path)
    os.mkfifo(run.lock_file)
    with pytest.raises(UserError, match="is not a regular file"):
        RunDirLock(run).acquire()


@pytest.mark.slow
def test_train_with_a_symlinked_lock_exits_2_and_overwrites_nothing(tmp_path, corpus):
    victim = tmp_path / "precious.txt"
    victim.write_text("my notes\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(victim)
    before = tree(run_dir)
    outcome = train(run_dir, corpus)
    assert_refused(outcome, str(run_dir / ".lock"), "is a symbolic link")
    assert victim.read_text() == "my notes\n"
    assert tree(run_dir) == before


# --- rendezvous flags ------------------------------------------------------------------------
@pytest.mark.parametrize(("backend", "endpoint", "needle"), [
    ("etcd-v3", None, "unknown rendezvous backend 'etcd-v3'"),
    ("c10d", "node0:http", "port 'http' is not a number"),
    ("c10d", "node0:70000", "port '70000' is not a number from 1 to 65535"),
    ("c10d", "fe80::1:29400", "an IPv6 address needs brackets"),
    ("c10d", ":29400", "not a host name"),
])
def test_bad_rendezvous_flags(backend, endpoint, needle):
    with pytest.raises(UserError, match=needle):
        check_rendezvous(backend, endpoint)


@pytest.mark.parametrize("endpoint", ["node0:29400", "localhost", "[::1]:29400", "10.0.0.1:1"])
def test_good_rendezvous_endpoints(endpoint):
    check_rendezvous("c10d", endpoint)
    check_rendezvous("static", endpoint)


@pytest.mark.slow
def test_train_with_bad_rendezvous_flags_creates_nothing(tmp_path, corpus):
    run_dir = tmp_path / "run"
    outcome = train(run_dir, corpus, "--rdzv-backend", "etcd-v3", "--rdzv-endpoint",
                    "node0:port")
    assert_refused(outcome, "--rdzv-backend: unknown rendezvous backend",
                   "--rdzv-endpoint: 'node0:port'")
    assert not run_dir.exists()


# --- how workers start -----------------------------------------------------------------------
def test_start_method_auto_forks_cpu_workers_and_execs_on_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_start_method("auto") == "fork"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert resolve_start_method("auto") == "exec"
    assert resolve_start_method("fork") == "fork" and resolve_start_method("exec") == "exec"


def test_rendezvous_events_keep_their_names_without_inspect_stack():
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import get_method_name

    def recorder(name_of):  # a rendezvous method that records an event
        return name_of()

    def next_rendezvous(name_of):
        return recorder(name_of)

    assert next_rendezvous(frame_function_name) == next_rendezvous(get_method_name) \
        == "next_rendezvous"
    assert frame_function_name(10_000) == "no_method_name"


def test_unknown_start_method_is_refused():
    with pytest.raises(UserError) as refused:
        check_options(LaunchOptions(run_dir=Path("run"), start_method="vfork"))
    assert "--start-method: unknown start method 'vfork'" in refused.value.render()


# --- the backend -----------------------------------------------------------------------------
def _te_installed() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(_te_installed(), reason="Transformer Engine is installed here")
def test_te_backend_without_transformer_engine_is_refused_by_the_check():
    from mtp_cli.config.loader import load_spec
    from tests.cli_helpers import SPECS

    with pytest.raises(UserError) as caught:
        check_backend(load_spec(SPECS / "tiny.yaml", ["model.backend=te"]))
    (problem,) = caught.value.problems
    assert problem.key == "model.backend" and "Transformer Engine" in problem.message
    check_backend(load_spec(SPECS / "tiny.yaml"))  # local: nothing to import


@pytest.mark.slow
@pytest.mark.skipif(_te_installed(), reason="Transformer Engine is installed here")
def test_train_with_te_backend_but_no_transformer_engine(tmp_path, corpus):
    run_dir = tmp_path / "run"
    outcome = train(run_dir, corpus, "model.backend=te")
    assert_refused(outcome, "model.backend", "Transformer Engine")
    assert not run_dir.exists()


# --- run-directory entries -------------------------------------------------------------------
def test_entry_check_names_each_wrong_entry(tmp_path):
    run = RunDir(tmp_path / "run")
    check_run_dir_entries(run)  # no directory yet: nothing to check
    run.root.mkdir()
    check_run_dir_entries(run)
    run.tb.write_text("x")
    run.metrics.mkdir()
    run.checkpoints.symlink_to(tmp_path / "elsewhere")
    run.lock_file.symlink_to(tmp_path / "victim")
    with pytest.raises(UserError) as caught:
        check_run_dir_entries(run)
    assert [p.render() for p in caught.value.problems] == [
        f"{run.lock_file}: is a symbolic link, expected a regular file (move it away, or pass "
        "another --run-dir)",
        f"{run.metrics}: is a directory, expected a regular file (move it away, or pass another "
        "--run-dir)",
        f"{run.tb}: is a regular file, expected a directory (move it away, or pass another "
        "--run-dir)",
        f"{run.checkpoints}: is a symbolic link, expected a directory (move it away, or pass "
        "another --run-dir)",
    ]


@pytest.mark.slow  # chattr (as root) runs as a process
def test_entry_check_finds_an_unwritable_directory(tmp_path):
    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    with read_only_directory(run.checkpoints), pytest.raises(UserError) as caught:
        check_run_dir_entries(run)
    assert [p.render() for p in caught.value.problems] == [
        f"{run.checkpoints}: is not writable (move it away, or pass another --run-dir)"]


@pytest.mark.slow
def test_run_dir_entries_of_the_wrong_type(tmp_path, corpus):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tb").write_text("not a directory")
    (run_dir / "metrics.jsonl").mkdir()
    (run_dir / "checkpoints").write_text("not a directory")
    before = tree(run_dir)
    outcome = train(run_dir, corpus)
    text = assert_refused(outcome)
    assert f"{run_dir / 'tb'}: is a regular file, expected a directory" in text
    assert f"{run_dir / 'metrics.jsonl'}: is a directory, expected a regular file" in text
    assert f"{run_dir / 'checkpoints'}: is a regular file, expected a directory" in text
    assert tree(run_dir) == before
    # --overwrite deletes only what training wrote: not a file named like its directories
    outcome = train(run_dir, corpus, "--overwrite")
    assert_refused(outcome, "tb: is a regular file")
    assert tree(run_dir) == before


@pytest.mark.slow
def test_unwritable_checkpoints_directory(tmp_path, corpus):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    with read_only_directory(run_dir / "checkpoints"):
        before = tree(run_dir)
        outcome = train(run_dir, corpus)
        assert_refused(outcome, f"{run_dir / 'checkpoints'}: is not writable")
        assert tree(run_dir) == before
