"""What `mtp train` says before step 1 (model size, world and layout, run directory, fresh or
resumed, data and tokens per step) and what `--overwrite` removed."""

from __future__ import annotations

import pytest

from mtp_cli.checkpoint.run_dir import RunDir
from mtp_cli.config.loader import load_spec
from mtp_cli.launch.banner import DataSummary, overwrite_summary, start_banner
from mtp_cli.plan.run_plan import RunPlan
from tests.cli_helpers import SPECS
from tests.train_helpers import TINY, run_train


def test_banner_names_model_world_run_and_data(tmp_path):
    spec = load_spec(SPECS / "tiny.yaml", ["parallel.tensor=2"])
    plan = RunPlan.of(spec, 4)
    data = DataSummary("/data/corpus", 12, 34_567, 890)
    text = start_banner(plan, RunDir(tmp_path / "run"), parameters=353_472, nproc=2,
                        nnodes=2, resume_step=None, data=data)
    assert text.splitlines() == [
        "mtp train: 353,472 parameters (D=2 MTP depths), world size 4 = data 2 x tensor 2 x "
        "pipeline 1 x context 1 (2 nodes x 2 processes)",
        f"run directory {tmp_path / 'run'}: fresh start, 300 steps",
        "data: /data/corpus: 12 training documents, 34,567 training tokens (890 held out); "
        "16 x 64 = 1,024 tokens per step",
    ]
    resumed = start_banner(plan, RunDir(tmp_path / "run"), parameters=1, nproc=2,
                           nnodes=2, resume_step=100, data=data)
    assert f"{tmp_path / 'run'}: resuming from step 100 of 300 (checkpoint step_0000100)" in \
        resumed


def test_banner_names_the_expert_parallel_size(tmp_path):
    spec = load_spec(SPECS / "tiny_moe.yaml", ["parallel.expert=2"])
    text = start_banner(RunPlan.of(spec, 4), RunDir(tmp_path / "run"),
                        parameters=1, nproc=4, nnodes=1, resume_step=None,
                        data=DataSummary("x", 1, 1, 1))
    assert "world size 4 = data 4 x tensor 1 x pipeline 1 x context 1, expert 2 of data x " \
        "context (1 node x 4 processes)" in text


def test_overwrite_summary_lists_what_goes(tmp_path):
    run = RunDir(tmp_path)
    assert overwrite_summary(run) is None
    for name in ("step_0000004", "step_0000008", "step_0000012.tmp-1"):
        (run.checkpoints / name).mkdir(parents=True)
    run.metrics.write_text('{"step": 1}\n{"step": 2}\n')
    run.tb.mkdir()
    assert overwrite_summary(run) == (
        f"--overwrite: removed checkpoints/ (2 checkpoints, newest step_0000008), "
        f"metrics.jsonl (2 lines), tb/ from {tmp_path}")


@pytest.mark.slow
def test_banner_before_step_1_then_resume_then_overwrite(tmp_path):
    from tests.train_helpers import make_corpus

    corpus = make_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    first = run_train(run_dir, corpus, "train.steps=4")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].startswith("mtp train: ") and "parameters (D=2 MTP depths), world size 1 = " \
        "data 1 x tensor 1 x pipeline 1 x context 1 (1 node x 1 process)" in lines[0]
    assert lines[1] == f"run directory {run_dir}: fresh start, 4 steps"
    assert lines[2].startswith(f"data: {corpus}: ")
    assert lines[2].endswith("8 x 32 = 256 tokens per step")
    assert all(not line.startswith("step ") for line in lines[:3])
    again = run_train(run_dir, corpus, "train.steps=6")
    assert again.returncode == 0, again.stderr
    assert f"run directory {run_dir}: resuming from step 4 of 6 (checkpoint step_0000004)" in \
        again.stdout
    logged = len((run_dir / "metrics.jsonl").read_text().splitlines())  # train and val lines
    fresh = run_train(run_dir, corpus, "train.steps=2", flags=("--overwrite",))
    assert fresh.returncode == 0, fresh.stderr
    assert (f"--overwrite: removed checkpoints/ (2 checkpoints, newest step_0000006), "
            f"metrics.jsonl ({logged} lines), tb/ from {run_dir}") in fresh.stdout
    assert f"run directory {run_dir}: fresh start, 2 steps" in fresh.stdout


def test_tiny_overrides_are_what_the_slow_test_assumes():
    spec = load_spec(SPECS / "tiny.yaml", TINY)
    assert (spec.train.global_batch_size, spec.model.seq_length) == (8, 32)
    assert spec.checkpoint.keep_last == 2 and spec.checkpoint.interval == 4
