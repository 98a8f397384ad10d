"""Spec files built to exhaust the machine: an alias bomb ("billion laughs"), a recursive alias,
100k levels of nesting, a huge file, a FIFO. Each `mtp build` runs under an address-space limit
and a timeout and must exit 2 naming the file, with no traceback and nothing run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mtp_cli.config.loader import load_spec
from mtp_cli.errors import SpecError
from tests.hostile_helpers import assert_refused, run_bounded

MODEL = "model: {vocab_size: 64, hidden_size: 32, num_layers: 2, num_attention_heads: 4, " \
        "seq_length: 8}\n"


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """width^levels values from about levels x width aliases."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


CASES = {
    "alias_bomb": (MODEL + "modules:\n  decoder_layer: {module: TransformerLayer, params: "
                   "{x: *a9}}\n", "aliases"),
    "alias_bomb_top": (alias_bomb() + MODEL, "expands to more than 100,000 values"),
    "recursive_alias": (MODEL + "mtp: &m {loss_scaling_factor: [*m]}\n", "recursive"),
    "deep_nesting": (MODEL + "mtp: " + "[" * 100_000 + "]" * 100_000 + "\n",
                     "nested more than 64 deep"),
}


def spec_text(name: str, depth: int = 100_000) -> str:
    text = CASES[name][0]
    if name == "deep_nesting":
        text = MODEL + "mtp: " + "[" * depth + "]" * depth + "\n"
    return alias_bomb() + text if name == "alias_bomb" else text


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_spec_is_refused_by_the_loader(tmp_path: Path, name):
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(name, depth=2_000))
    with pytest.raises(SpecError) as caught:
        load_spec(spec)
    (problem,) = caught.value.problems
    assert problem.file == str(spec) and CASES[name][1] in problem.message


def override_bomb() -> str:
    return "{" + ", ".join(
        [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "x"] * 10) + "]"
         for i in range(7)]) + "}"


def test_alias_bomb_in_an_override_is_refused_by_the_loader(tmp_path: Path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(MODEL)
    with pytest.raises(SpecError, match="expands to more than 100,000 values"):
        load_spec(spec, [f"modules.decoder_layer={override_bomb()}"])


def test_huge_spec_file_is_refused_by_the_loader(tmp_path: Path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(MODEL + "# " + "x" * (9 << 20) + "\n")
    with pytest.raises(SpecError, match="more than a spec may hold"):
        load_spec(spec)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_hostile_spec_is_refused_in_bounded_memory(tmp_path: Path, name):
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(name))
    needle = CASES[name][1]
    outcome = run_bounded("build", str(spec), cwd=tmp_path)
    assert_refused(outcome, str(spec), needle)
    assert outcome.cpu_seconds < 30  # a refusal is ~3 s of CPU (mostly importing torch)


@pytest.mark.slow
def test_alias_bomb_in_an_override(tmp_path: Path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(MODEL)
    outcome = run_bounded("build", str(spec), f"modules.decoder_layer={override_bomb()}",
                          cwd=tmp_path)
    assert_refused(outcome, "override 'modules.decoder_layer=", "expands to more than 100,000")


@pytest.mark.slow
def test_huge_spec_file_is_not_read(tmp_path: Path):
    spec = tmp_path / "spec.yaml"
    with open(spec, "w") as handle:
        handle.write(MODEL)
        handle.write("# " + "x" * (9 << 20) + "\n")
    outcome = run_bounded("build", str(spec), cwd=tmp_path)
    assert_refused(outcome, str(spec), "more than a spec may hold (8,388,608)")


@pytest.mark.slow
def test_fifo_spec_does_not_hang(tmp_path: Path):
    spec = tmp_path / "spec.yaml"
    os.mkfifo(spec)
    outcome = run_bounded("build", str(spec), cwd=tmp_path, timeout=60)
    assert_refused(outcome, str(spec), "not a regular file")


@pytest.mark.slow
def test_yaml_tags_never_run(tmp_path: Path):
    marker = tmp_path / "MARKER"
    spec = tmp_path / "spec.yaml"
    spec.write_text(MODEL + f"data: {{path: !!python/object/apply:os.system ['touch {marker}']}}"
                            "\n")
    outcome = run_bounded("build", str(spec), cwd=tmp_path)
    assert_refused(outcome, f"{spec}:2:", "data.path", "python/object/apply")
    assert not marker.exists()
