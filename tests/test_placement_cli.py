"""`mtp build` with pipeline layouts, as a user runs it: the stage plan, and malformed layouts."""

from __future__ import annotations

import json

import pytest

from tests.cli_helpers import SPECS, run_mtp

SPEC_TEMPLATE = """\
# a tiny model split over {pipeline} pipeline ranks
model: {{vocab_size: 64, hidden_size: 16, num_attention_heads: 2, seq_length: 8,
        num_layers: {num_layers}, position_embedding: rope, normalization: RMSNorm,
        add_bias_linear: false}}
mtp: {{num_layers: {depths}}}
parallel:
  pipeline: {pipeline}
  layout: "{layout}"
"""
LAYOUT_LINE = 8

# (layout, num_layers, D, pipeline, 1-based column of the fault, words of the message)
MALFORMED = [
    ("Etttt|tttt|q|L", 8, 1, 4, 12, "unknown character 'q'"),
    ("Ett(tt|tttt|m|L", 8, 1, 4, 16, "'(' is never closed"),
    ("E(tttt|)tttt|m|L", 8, 1, 4, 9, "followed by *n"),
    ("Etttt|tttt|m*|L", 8, 1, 4, 14, "needs a count"),
    ("tEttt|tttt|m|L", 7, 1, 4, 1, "must open with E"),
    ("Etttt|tttt|L|m", 8, 1, 4, 14, "must close with L"),
    ("Etttt|t*5|m|L", 8, 1, 4, 7, "9 decoder layers"),
    ("Etttt|tttt|mm|L", 8, 1, 4, 13, "2 MTP layers"),
    ("Et|t|t|m|t|t|t|L", 6, 1, 4, 10, "decoder layer after the first MTP layer"),
    ("Etttt|m|m|L", 4, 2, 4, 9, "split over stages 1 and 2"),
    ("Et|t|m|||L", 2, 1, 2, 6, "must be in vp_stage 2"),
    ("Etttt|tttt|mL", 8, 1, 2, 14, "3 stages, not a multiple of parallel.pipeline (2)"),
]


def write_spec(tmp_path, layout: str, num_layers: int, depths: int, pipeline: int):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC_TEMPLATE.format(layout=layout, num_layers=num_layers, depths=depths,
                                         pipeline=pipeline))
    return path


@pytest.mark.parametrize(("layout", "num_layers", "depths", "pipeline", "column", "words"),
                         MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_layout_exits_2_pointing_at_the_fault(tmp_path, layout, num_layers, depths,
                                                        pipeline, column, words) -> None:
    path = write_spec(tmp_path, layout, num_layers, depths, pipeline)
    result = run_mtp("build", str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert f"{path}:{LAYOUT_LINE}:" in lines[0] and "parallel.layout:" in lines[0]
    assert words in lines[0] and f"at layout column {column}:" in lines[0]
    shown = next(i for i, line in enumerate(lines) if line.endswith(f"    {layout}"))
    caret = lines[shown + 1]
    assert caret.rstrip().endswith("^")
    assert caret.index("^") == lines[shown].index(layout) + column - 1


def test_override_layout_error_names_the_override() -> None:
    result = run_mtp("build", str(SPECS / "tiny.yaml"), "parallel.pipeline=2",
                     "parallel.layout=Ett|ttx")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "override 'parallel.layout=Ett|ttx'" in result.stderr
    assert "unknown character 'x'" in result.stderr and "layout column 7" in result.stderr


def test_build_json_lists_the_stages(tmp_path) -> None:
    path = write_spec(tmp_path, "Etttt|tttt|m|L", 8, 1, 4)
    result = run_mtp("build", str(path), "model.share_embeddings_and_output_weights=true",
                     "--json")
    assert result.returncode == 0, result.stderr
    stages = json.loads(result.stdout)["stages"]
    h, v = 16, 64
    layer = 2 * h + h * 3 * h + h * h + h * 4 * h + 4 * h * h  # norms, qkv, proj, fc1, fc2
    assert [s["decoder_layers"] for s in stages] == [[1, 2, 3, 4], [5, 6, 7, 8], [], []]
    assert [(s["pp_rank"], s["vp_stage"]) for s in stages] == [(r, None) for r in range(4)]
    assert [(s["mtp_layers"], s["mtp_layer_offset"]) for s in stages] == [
        (0, 0), (0, 0), (1, 0), (0, 1)]
    assert [(s["embedding"], s["loss"], s["standalone_mtp"]) for s in stages] == [
        (True, False, False), (False, False, False), (False, False, True), (False, True, False)]
    mtp_layer = 3 * h + 2 * h * h + layer  # enorm, hnorm, final norm, eh_proj, layer
    assert [s["parameters"] for s in stages] == [
        v * h + 4 * layer,  # embedding + layers 1-4
        4 * layer + h,  # layers 5-8 + the decoder's final norm
        v * h + mtp_layer,  # the MTP stage's embedding copy + MTP layer
        v * h,  # the loss stage's copy of the tied output weight
    ]


def test_build_table_and_deepseek_layout_stay_fast() -> None:
    result = run_mtp("build", str(SPECS / "deepseek_v3_dense_dims.yaml"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    stages = report["stages"]
    assert len(stages) == 32 and stages[16]["pp_rank"] == 0 and stages[16]["vp_stage"] == 1
    assert stages[-1]["mtp_layers"] == 1 and stages[-1]["loss"]
    assert sorted(n for s in stages for n in s["decoder_layers"]) == list(range(1, 62))
    table = run_mtp("build", str(SPECS / "tiny.yaml"), "parallel.pipeline=2")
    assert table.returncode == 0, table.stderr
    assert "Pipeline stages (pipeline 2)" in table.stdout
