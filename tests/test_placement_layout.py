"""Layout strings: expansion, syntax errors with positions, and each validation rule."""

from __future__ import annotations

import pytest

from mtp_cli.errors import SpecError
from mtp_cli.plan.layout import LayoutError, parse_layout
from tests.placement_helpers import make_spec


def stage_strings(text: str) -> list[str]:
    return ["".join(t.kind for t in stage) for stage in parse_layout(text).stages]


@pytest.mark.parametrize(("text", "stages"), [
    ("Etttt|tttt|m|L", ["Etttt", "tttt", "m", "L"]),
    ("Ettt|(tt|)*3,m|L", ["Ettt", "tt", "tt", "tt", "m", "L"]),  # Megatron's docstring form
    ("Et|(tt|)*30mL", ["Et"] + ["tt"] * 30 + ["mL"]),  # DeepSeek-V3's layout
    ("E,t,t|L", ["Ett", "L"]),  # commas are cosmetic
    ("Et*1,2|L", ["E" + "t" * 12, "L"]),  # ... even inside a count, as in Megatron
    ("Et|*2tL", ["Et", "", "tL"]),  # '|' repeats like any character: an empty stage
    ("Et*0|tL", ["E", "tL"]),
    ("E(t*2|)*2L", ["Ett", "tt", "L"]),
])
def test_layout_expands_like_megatron(text: str, stages: list[str]) -> None:
    assert stage_strings(text) == stages


def test_tokens_remember_their_source_character() -> None:
    layout = parse_layout("Et*3|(tm|)*2L")
    positions = [[t.position for t in stage] for stage in layout.stages]
    # E at 0, the three t from 't' at 1; the group's t at 6 and m at 7, twice; L at 12.
    assert positions == [[0, 1, 1, 1], [6, 7], [6, 7], [12]]
    assert layout.separators == (4, 8, 8)


@pytest.mark.parametrize(("text", "position", "words"), [
    ("Etx|L", 2, "unknown character 'x'"),
    ("E(t|L", 5, "never closed"),
    ("Et)|L", 2, "without a matching '('"),
    ("E(t|)L", 5, "followed by *n"),
    ("E()*2|L", 1, "empty group"),
    ("E((t)*2)*2|L", 2, "nested parentheses"),
    ("*2Et|L", 0, "'*' must follow"),
    ("Et*|L", 3, "needs a count"),
    ("Et*2*3|L", 4, "cannot be repeated again"),
    ("Et t|L", 2, "whitespace"),
    ("Et2|L", 2, "stray digit"),
    ("", 0, "empty"),
    ("Et*99999999|L", 2, "too many"),
])
def test_syntax_errors_point_at_the_character(text: str, position: int, words: str) -> None:
    with pytest.raises(LayoutError) as caught:
        parse_layout(text)
    assert caught.value.position == position
    assert words in caught.value.detail
    lines = caught.value.describe().splitlines()
    assert lines[1] == f"    {text}"
    assert lines[2] == "    " + " " * position + "^"
    assert f"layout column {position + 1}:" in lines[0]


def rejection(num_layers: int, depths: int, pipeline: int, layout: str, **parallel) -> str:
    with pytest.raises(SpecError) as caught:
        make_spec(num_layers, depths, pipeline, layout, **parallel)
    (problem,) = caught.value.problems
    return problem.render()


@pytest.mark.parametrize(("args", "rule", "column"), [
    ((1, 0, 2, "tE|L"), "one E, first", 1),
    ((1, 0, 3, "|Et|L"), "one E, first", 1),  # stricter than Megatron: E opens stage 0
    ((1, 0, 2, "Et|Lt"), "one L, last", 5),
    ((1, 0, 3, "Et|L|"), "one L, last", 6),  # stricter than Megatron: L closes the last stage
    ((1, 0, 2, "Et|EL"), "one E, first", 4),
    ((2, 0, 2, "EtL|tL"), "one L, last", 3),
    ((2, 0, 2, "Ettt|L"), "t count = model.num_layers", 4),
    ((3, 0, 2, "Ett|L"), "t count = model.num_layers", 6),
    ((2, 1, 2, "Ettmm|L"), "m count = mtp.num_layers", 5),
    ((2, 0, 2, "Ettm|L"), "m count = mtp.num_layers", 4),
    ((4, 2, 4, "Etttt|m|m|L"), "all m in one stage", 9),
    ((3, 2, 4, "Et|tm|tm|L"), "all m in one stage", 8),  # the reference's `...tm|tm|L`
    ((6, 1, 4, "Et|t|t|m|t|t|t|L"), "no t after the first m", 10),  # the reference's example
    ((2, 1, 2, "Et|t|m|||L"), "the m stage is the last virtual stage of its rank", 6),
    ((1, 0, 2, "Et|t|L"), "stage count is a multiple of pipeline", 7),
])
def test_rule_violations_name_the_rule_and_column(args, rule: str, column: int) -> None:
    text = rejection(*args)
    assert text.startswith("parallel.layout: ")
    assert f"[rule: {rule}] at layout column {column}:" in text
    assert text.splitlines()[-1] == "    " + " " * (column - 1) + "^"


def test_virtual_pipeline_must_agree_with_the_layout() -> None:
    text = rejection(3, 0, 2, "Et|t|t|L", virtual_pipeline=3)
    assert "virtual_pipeline = stages / pipeline" in text
    assert make_spec(3, 0, 2, "Et|t|t|L", virtual_pipeline=2).parallel.virtual_pipeline == 2
    # given nothing, the layout sets it; one stage per rank leaves it unset
    assert make_spec(3, 0, 2, "Et|t|t|L").parallel.virtual_pipeline == 2
    assert make_spec(3, 0, 2, "Ett|tL").parallel.virtual_pipeline is None


@pytest.mark.parametrize("key", ["num_layers_in_first_pipeline_stage",
                                 "account_for_loss_in_pipeline_split"])
def test_layout_excludes_the_split_options(key: str) -> None:
    value = 1 if key.startswith("num_layers") else True
    text = rejection(2, 0, 2, "Et|tL", **{key: value})
    assert text.startswith(f"parallel.{key}: ")
    assert "cannot be combined with parallel.layout" in text


def test_layout_errors_in_a_file_point_at_its_line(tmp_path) -> None:
    from mtp_cli import load_spec

    path = tmp_path / "spec.yaml"
    path.write_text(
        "model: {vocab_size: 64, hidden_size: 16, num_attention_heads: 2, seq_length: 8,\n"
        "        num_layers: 4}\n"
        "parallel:\n"
        "  pipeline: 2\n"
        "  layout: Ett|tm\n"
    )
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    (problem,) = caught.value.problems
    assert (problem.file, problem.line, problem.key) == (str(path), 5, "parallel.layout")
    assert "the layout must close with L" in problem.message
