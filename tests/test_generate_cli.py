"""`mtp generate` and `mtp eval` on checkpoints as users have them: a run directory, a DCP
checkpoint directory, an exported Hugging Face directory; bad input exits 2 with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mtp_cli.builders.model_builder import build_model
from mtp_cli.cli import app
from mtp_cli.config.loader import load_spec
from tests.generate_helpers import save_run_dir, tiny_spec
from tests.train_helpers import make_corpus


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _run_dir(root: Path, corpus: Path, depths: int) -> Path:
    spec = tiny_spec(depths=depths, vocab=320, hidden=32, seq_length=64)
    data = spec.model_dump(mode="json")
    data["data"]["path"] = str(corpus)
    spec = load_spec(data)
    return save_run_dir(build_model(spec).eval(), spec, root / f"d{depths}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("gen")
    corpus = make_corpus(root / "corpus")
    return {d: _run_dir(root, corpus, d) for d in (0, 2)}


def test_generate_json_from_run_dir_and_dcp_checkpoint(runs):
    for path in (runs[2], runs[2] / "checkpoints" / "step_0000000"):
        result = invoke("generate", path, "--prompt", "def f(", "--prompt", "import os\n",
                        "--max-new-tokens", "12", "--json")
        assert result.exit_code == 0, result.output
        payload = json.loads(result.stdout)
        assert [c["prompt"] for c in payload["completions"]] == ["def f(", "import os\n"]
        assert payload["speculative"]["draft_depths"] == 2
        assert len(payload["speculative"]["per_depth"]) == 2
        assert payload["identical_to_plain"] is True
        assert payload["speedup"] > 0 and payload["tokens_per_s"] > 0


@pytest.mark.slow
def test_generate_streams_text_and_prints_a_summary(runs):
    result = invoke("generate", runs[2], "--prompt", "class A:", "--max-new-tokens", "8",
                    "--draft-depths", "1", "--temperature", "0.8", "--top-p", "0.9",
                    "--seed", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("class A:")
    assert "speculative K=1" in result.stdout and "speed-up" in result.stdout


@pytest.mark.slow
def test_generate_plain_without_mtp_layers(runs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a = 1\nfor i in\n")
    result = invoke("generate", runs[0], "--prompt-file", prompts, "--max-new-tokens", "5",
                    "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["speculative"] is None and len(payload["completions"]) == 2


@pytest.mark.parametrize(("depths", "args", "reason"), [
    (0, ["--prompt", "x", "--speculative", "on"], "no MTP layers"),
    (2, ["--prompt", "x", "--draft-depths", "3"], "more than the checkpoint's 2 MTP depths"),
    (2, ["--prompt", ""], "empty"),
    (2, ["--prompt", "x" * 65], "longer than the model's maximum positions (64)"),
    (2, [], "at least one prompt"),
    (2, ["--prompt", "x", "--top-p", "0"], "--top-p"),
    (2, ["--prompt", "x", "--temperature", "-1"], "--temperature"),
    (2, ["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (2, ["--prompt", "x", "--speculative", "maybe"], "auto, on or off"),
])
def test_generate_bad_input_exits_2(runs, depths, args, reason):
    result = invoke("generate", runs[depths], *args)
    assert result.exit_code == 2, result.output
    assert reason in result.output
    assert "Traceback" not in result.output


def test_generate_bad_prompt_file_and_checkpoint_exit_2(runs, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("ok\n\nalso ok\n")
    result = invoke("generate", runs[2], "--prompt-file", prompts)
    assert result.exit_code == 2 and f"{prompts}:2" in result.output
    result = invoke("generate", tmp_path / "missing", "--prompt", "x")
    assert result.exit_code == 2 and "no such file" in result.output


@pytest.mark.slow
def test_eval_writes_its_result_and_report_shows_it(runs):
    run = runs[2]
    result = invoke("eval", run, "--tokens", "256", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    written = run / "eval" / "step_0000000.json"
    assert payload["written"] == str(written)
    assert json.loads(written.read_text())["lm_loss"] == payload["lm_loss"]
    assert payload["tokens"] >= 256 and payload["split"] == "val"
    assert [d["depth"] for d in payload["depths"]] == [1, 2]
    for row in payload["depths"]:
        assert row["loss"] > 0
        for key in ("top1_vs_labels", "top1_vs_main_greedy", "joint_prefix_rate",
                    "speculative_acceptance_rate"):
            assert 0 <= row[key] <= 1
        assert row["joint_prefix_rate"] <= row["top1_vs_main_greedy"] + 1e-12
    assert payload["acceptance_length"]["speculative"] >= 1
    # `mtp report` shows it (a run directory with a metrics line)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 64, "lm_loss": 5.0,
                                                   "mtp_1_loss": 5.1, "mtp_2_loss": 5.2}) + "\n")
    report = invoke("report", run, "--json", "--out", run / "plots")
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout)["runs"][0]["eval"]["lm_loss"] == payload["lm_loss"]
    shown = invoke("report", run, "--out", run / "plots")
    assert "eval of step 0 on val" in shown.stdout and "acceptance length" in shown.stdout


def test_eval_bad_split_exits_2(runs):
    result = invoke("eval", runs[2], "--split", "test")
    assert result.exit_code == 2 and "--split" in result.output


@pytest.mark.slow
def test_generate_from_an_exported_directory_matches_the_run(runs, tmp_path):
    out = tmp_path / "hf"
    exported = invoke("export", runs[2], "--out", out)
    assert exported.exit_code == 0, exported.output
    args = ["--prompt", "def g(", "--max-new-tokens", "10", "--json"]
    ours = json.loads(invoke("generate", runs[2], *args).stdout)
    theirs = invoke("generate", out, *args)
    assert theirs.exit_code == 0, theirs.output
    theirs = json.loads(theirs.stdout)
    assert [c["text"] for c in theirs["completions"]] == [c["text"] for c in ours["completions"]]
    assert theirs["speculative"]["draft_depths"] == 2
    # transformers' own greedy generate() on the exported model: the same tokens
    from transformers import AutoModelForCausalLM

    from mtp_cli.generate.load import load_for_generation
    from mtp_cli.generate.run import GenerateOptions, decode_ids

    loaded = load_for_generation(runs[2], device="cpu")
    prompt = loaded.tokenizer.encode("def g(")
    ids, _, _ = decode_ids(loaded, [prompt], GenerateOptions(max_new_tokens=10), 2)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    generated = hf.generate(prompt[None], max_new_tokens=len(ids[0]), do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    assert generated[0, len(prompt):].tolist() == ids[0]


@pytest.mark.slow
def test_generate_and_eval_a_pipeline_parallel_training_run(tmp_path):
    """A checkpoint `mtp train` wrote at pipeline 2 (two processes) decodes on one device."""
    from tests.train_helpers import run_train

    corpus = make_corpus(tmp_path / "corpus")
    run = tmp_path / "pp2"
    trained = run_train(run, corpus, "parallel.pipeline=2", nproc=2)
    assert trained.returncode == 0, trained.stderr
    result = invoke("generate", run, "--prompt", "def ", "--prompt", "import json\n",
                    "--max-new-tokens", "16", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["identical_to_plain"] is True
    assert payload["speculative"]["draft_depths"] == 2
    evaluated = invoke("eval", run, "--tokens", "128", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert (run / "eval" / "step_0000010.json").is_file()
    assert json.loads(evaluated.stdout)["step"] == 10
