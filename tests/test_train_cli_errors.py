"""Bad input to `mtp train` is refused before anything starts: exit 2, a message that names the
culprit, no traceback, and nothing created or half-written on disk."""

from __future__ import annotations

import pytest

from tests.cli_helpers import run_mtp
from tests.train_helpers import TINY, make_corpus


def refuse(run_dir, *args: str, data: str | None = None) -> str:
    extra = [f"data.path={data}"] if data is not None else []
    result = run_mtp("train", "specs/tiny.yaml", *TINY, *extra, "--run-dir", str(run_dir), *args,
                     real_process=False)  # refused before any launch
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert not run_dir.exists()  # nothing left behind
    return result.stderr


def test_missing_data_path(tmp_path):
    text = refuse(tmp_path / "run", data=str(tmp_path / "nowhere"))
    assert "data.path" in text and "nowhere" in text and "does not exist" in text


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    assert "empty corpus" in refuse(tmp_path / "run", data=str(tmp_path / "empty"))


def test_corpus_shorter_than_one_window(tmp_path):
    (tmp_path / "short.txt").write_text("too short")
    text = refuse(tmp_path / "run", data=str(tmp_path / "short.txt"))
    assert "shorter than one window" in text and "33 tokens" in text


def test_run_dir_under_a_regular_file(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    (tmp_path / "file").write_text("x")
    text = refuse(tmp_path / "file" / "run", data=str(corpus))
    assert "is not a directory" in text and "--run-dir" in text


@pytest.mark.parametrize(("args", "message"), [
    (["--nproc", "3"], "micro_batch_size x data-parallel size (2 x 3 = 6)"),
    (["parallel.tensor=2", "--nproc", "3"], "= 2 does not divide the world size 3"),
    (["--nnodes", "2"], "--nnodes > 1 needs --rdzv-endpoint"),
    (["model.num_layers=4", "parallel.pipeline=2", "parallel.virtual_pipeline=2",
      "parallel.microbatch_group_size_per_vp_stage=3", "--nproc", "2"],
     "parallel.microbatch_group_size_per_vp_stage: M (4) mod microbatch_group_size_per_vp_stage "
     "(3) must be 0 or at least pipeline (2), it is 1"),
    (["model.num_layers=8", "parallel.pipeline=4", "parallel.virtual_pipeline=2",
      "train.global_batch_size=4", "--nproc", "4"],
     "parallel.microbatch_group_size_per_vp_stage: the number of contiguous micro-batches in a "
     "virtual pipeline stage (4) must range in [pipeline=4, M=2] (g defaults to pipeline)"),
])
def test_parallel_sizes_that_do_not_fit(tmp_path, args, message):
    overrides = [a for a in args if "=" in a]
    flags = [a for a in args if "=" not in a]
    result = run_mtp("train", "specs/tiny.yaml", *TINY, *overrides, "--run-dir",
                     str(tmp_path / "run"), *flags, real_process=False)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr.replace("\n", " ")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_run_dir_in_use_by_another_job(tmp_path):
    from mtp_cli.checkpoint.run_dir import RunDir, RunDirLock

    corpus = make_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    with RunDirLock(RunDir(run_dir)):
        result = run_mtp("train", "specs/tiny.yaml", *TINY, f"data.path={corpus}",
                         "--run-dir", str(run_dir), real_process=False)
    assert result.returncode == 2
    assert "in use by another `mtp train`" in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]


def test_context_parallel_needs_seq_length_divisible_by_2cp(tmp_path):
    text = refuse(tmp_path / "run", "parallel.context=3", "--nproc", "3")
    assert "parallel.context" in text and "2 x context (6)" in text


def test_layout_for_another_pipeline_size(tmp_path):
    text = refuse(tmp_path / "run", "parallel.pipeline=2", "parallel.layout=Et|t|mmL",
                  "--nproc", "2")
    assert "parallel.layout" in text and "multiple of" in text


