"""Size limits checked from the spec's numbers before anything is built: at most 2 x 10^5
modules, every tensor below 2^62 elements. The estimate is held against real meta-device
builds, and absurd sizes are refused in seconds with little memory."""

from __future__ import annotations

import pytest

from mtp_cli import build_model, load_spec
from mtp_cli.config.limits import (
    DECODER_LAYER_MODULES,
    MAX_MODULES,
    MTP_LAYER_OWN_MODULES,
    Part,
    estimated_modules,
    model_parts,
)
from mtp_cli.errors import SpecError
from tests.cli_helpers import REPO_ROOT
from tests.hostile_helpers import assert_refused, run_bounded, tree
from tests.train_helpers import TINY

SPECS = [
    ("specs/tiny.yaml", []),
    ("specs/tiny.yaml", ["mtp.num_layers=0", "model.position_embedding=learned_absolute",
                         "model.share_embeddings_and_output_weights=true"]),
    ("specs/tiny.yaml", ["mtp.use_repeated_layer=true", "model.activation=gelu"]),
    ("specs/gpt_125m.yaml", []),
    ("examples/custom_layer_spec.yaml", []),
]


@pytest.mark.parametrize(("path", "overrides"), SPECS)
def test_estimate_bounds_the_real_build(path, overrides):
    spec = load_spec(REPO_ROOT / path, overrides)
    model = build_model(spec, "meta")
    built = len(list(model.modules()))
    estimate = estimated_modules(model_parts(spec))
    assert built <= estimate <= 1.3 * built, (built, estimate)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    checked = 0
    for part in model_parts(spec):
        for tensor in part.tensors:
            name = tensor.name.replace(".N.", ".0.")
            if name in shapes:
                assert shapes[name] == tuple(d.size for d in tensor.dims), name
                checked += 1
    assert checked >= 6


def test_default_layer_module_counts_are_exact():
    one = load_spec(REPO_ROOT / "specs/tiny.yaml", ["model.num_layers=1", "mtp.num_layers=0"])
    two = load_spec(REPO_ROOT / "specs/tiny.yaml", ["model.num_layers=2", "mtp.num_layers=0"])
    mtp = load_spec(REPO_ROOT / "specs/tiny.yaml", ["model.num_layers=1", "mtp.num_layers=1"])

    def count(spec):
        return len(list(build_model(spec, "meta").modules()))

    assert count(two) - count(one) == DECODER_LAYER_MODULES
    # one MTP layer, plus the MTP block and its layer dict
    assert count(mtp) - count(one) == MTP_LAYER_OWN_MODULES + DECODER_LAYER_MODULES + 2


def test_deepseek_v3_with_its_experts_fits_the_module_limit():
    """DeepSeek-V3: 61 layers (3 dense, 58 MoE with 256 routed + 1 shared expert), one MTP
    layer (MoE). An MoE part as the limits module describes it: per expert an MLP with
    linear_fc1/linear_fc2 (3 modules), plus the router and the experts' containers."""
    spec = load_spec(REPO_ROOT / "specs/deepseek_v3_dense_dims.yaml")
    parts = model_parts(spec)
    moe_layer = 257 * 3 + 4
    parts.append(Part("MoE experts", 58 + 1, "model.num_layers", moe_layer))
    assert 45_000 < estimated_modules(parts) < MAX_MODULES


@pytest.mark.parametrize(("override", "key", "needle"), [
    ("model.num_layers=1000000000", "model.num_layers", "modules (1,000,000,000 x decoder layer"),
    ("mtp.num_layers=1000000000", "mtp.num_layers", "modules (1,000,000,000 x MTP layer"),
    ("model.hidden_size=1000000000000", "model.hidden_size", "fewer than 2^62"),
    ("model.vocab_size=10000000000000000000", "model.vocab_size",
     "embedding.word_embeddings.weight would be"),
    ("model.kv_channels=100000000000000000", "model.kv_channels", "linear_qkv.weight"),
    ("model.num_layers=20000", "model.num_layers", "the limit is 200,000"),
])
def test_absurd_sizes_are_refused_naming_the_key(override, key, needle):
    with pytest.raises(SpecError) as caught:
        load_spec(REPO_ROOT / "specs/tiny.yaml", [override])
    (problem,) = caught.value.problems
    assert problem.key == key and problem.file == f"override '{override}'"
    assert needle in problem.message


@pytest.mark.slow
@pytest.mark.parametrize("override", ["model.num_layers=1000000000", "mtp.num_layers=1000000000",
                                      "model.hidden_size=1000000000000"])
def test_build_refuses_quickly_in_bounded_memory(override):
    outcome = run_bounded("build", "specs/tiny.yaml", override)
    assert_refused(outcome, f"override '{override}'", override.split("=")[0])
    assert outcome.cpu_seconds < 30  # a refusal is ~3 s of CPU (mostly importing torch)


@pytest.mark.slow
def test_train_refuses_before_creating_anything(tmp_path):
    run_dir = tmp_path / "run"
    outcome = run_bounded("train", "specs/tiny.yaml", *TINY, "model.num_layers=1000000000",
                          "--run-dir", str(run_dir))
    assert_refused(outcome, "model.num_layers", "the limit is 200,000")
    assert tree(tmp_path) == []
