"""Parallel sizes: data-parallel size derived from the world size, errors when nothing fits."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mtp_cli import load_spec
from mtp_cli.errors import UserError
from mtp_cli.plan.dims import ParallelDims


def spec(*overrides: str):
    return load_spec("specs/tiny.yaml", ["train.micro_batch_size=2", "train.global_batch_size=16",
                                         *overrides])


def test_data_parallel_size_is_world_over_model_parallel():
    dims = ParallelDims.from_spec(spec("parallel.tensor=2", "parallel.context=2"), 8)
    assert (dims.dp, dims.tp, dims.cp, dims.pp, dims.dp_cp) == (2, 2, 2, 1, 4)
    assert dims.num_microbatches(spec()) == 4  # 16 samples / (2 per micro-batch x dp 2)
    assert ParallelDims.from_spec(spec(), 8).num_microbatches(spec()) == 1
    assert dims.as_dict() == {"data": 2, "tensor": 2, "pipeline": 1, "context": 2}


def test_model_parallel_sizes_must_divide_the_world():
    with pytest.raises(UserError, match=r"= 4 does not divide the world size 6"):
        ParallelDims.from_spec(spec("parallel.tensor=2", "parallel.pipeline=2"), 6)


def test_global_batch_must_split_over_data_parallel_ranks():
    with pytest.raises(UserError, match=r"micro_batch_size x data-parallel size \(2 x 3 = 6\)"):
        ParallelDims.from_spec(spec(), 3)


def test_fsdp_composes_with_model_parallel():
    for extra in ("parallel.pipeline=2", "parallel.tensor=2", "parallel.context=2"):
        dims = ParallelDims.from_spec(spec(extra), 4)
        dims.check_supported(spec(extra, "parallel.fsdp=true"))
        dims.check_supported(spec(extra))
    ParallelDims.from_spec(spec(), 4).check_supported(spec("parallel.fsdp=true"))


def test_launcher_checks_flags_before_anything_else(tmp_path):
    from mtp_cli.launch.launcher import LaunchOptions, plan_launch

    with pytest.raises(UserError, match="--nnodes > 1 needs --rdzv-endpoint"):
        plan_launch(spec(), LaunchOptions(run_dir=tmp_path / "run", nnodes=2))
    with pytest.raises(UserError, match=r"--node-rank 2 is not in \[0, --nnodes\)"):
        plan_launch(spec(), LaunchOptions(run_dir=tmp_path / "run", nnodes=2, node_rank=2,
                                          rdzv_endpoint="localhost:1"))
    assert not (tmp_path / "run").exists()


def interleaved(*overrides: str):
    return spec("model.num_layers=4", "parallel.pipeline=2", "parallel.virtual_pipeline=2",
                *overrides)


def test_interleaved_group_size_must_fit_the_micro_batches_of_a_step():
    """g = microbatch_group_size_per_vp_stage (default pp) against M = 16 / (2 x dp):
    pp <= g <= M, and M mod g is 0 or at least pp (Megatron-Core's rules)."""
    ParallelDims.from_spec(interleaved(), 2)  # M = 8, g = 2
    ParallelDims.from_spec(interleaved("parallel.microbatch_group_size_per_vp_stage=3"), 2)
    # M = 8, g = 3: 8 mod 3 = 2 >= pp
    with pytest.raises(UserError, match=r"microbatch_group_size_per_vp_stage: .*stage \(9\) must "
                                        r"range in \[pipeline=2, M=8\]") as error:
        ParallelDims.from_spec(interleaved("parallel.microbatch_group_size_per_vp_stage=9"), 2)
    assert error.value.problems[0].key == "parallel.microbatch_group_size_per_vp_stage"
    with pytest.raises(UserError, match=r"M \(4\) mod .* \(3\) must be 0 or at least pipeline "
                                        r"\(2\), it is 1"):  # dp 2: M = 4
        ParallelDims.from_spec(interleaved("parallel.microbatch_group_size_per_vp_stage=3"), 4)
    with pytest.raises(UserError, match=r"\(2\) must range in \[pipeline=2, M=1\] \(g "
                                        r"defaults to pipeline\); M = .* = 16 / \(2 x 8\) = 1"):
        # dp 8: M = 1 < pp
        ParallelDims.from_spec(interleaved(), 16)
    ParallelDims.from_spec(spec("parallel.pipeline=2"), 16)  # no virtual stages: no rule


def moe_spec(*overrides: str):
    return load_spec("specs/tiny_moe.yaml", ["train.micro_batch_size=2",
                                             "train.global_batch_size=16", *overrides])


def test_expert_parallel_is_carved_from_data_x_context_ranks():
    ParallelDims.from_spec(moe_spec("parallel.expert=2"), 2).check_supported(
        moe_spec("parallel.expert=2"))
    with pytest.raises(UserError, match=r"expert parallel size 4 must divide data x context = "
                                        r"2 x 1 = 2") as error:
        ParallelDims.from_spec(moe_spec("parallel.expert=4"), 2)
    assert error.value.problems[0].key == "parallel.expert"
    dims = ParallelDims.from_spec(moe_spec("parallel.expert=2", "parallel.pipeline=2"), 4)
    dims.check_supported(moe_spec("parallel.expert=2", "parallel.pipeline=2"))
    fsdp = moe_spec("parallel.expert=2", "parallel.fsdp=true")  # EP x FSDP2 composes
    ParallelDims.from_spec(fsdp, 4).check_supported(fsdp)


@pytest.mark.parametrize(("overrides", "nproc"), [
    (["parallel.context=2"], 2),
    (["parallel.context=2", "parallel.expert=2"], 4),
    (["parallel.context=2", "parallel.expert=4"], 4),
])
def test_moe_and_mla_models_run_context_parallel(overrides, nproc):
    spec_ = moe_spec(*overrides)
    ParallelDims.from_spec(spec_, nproc).check_supported(spec_)


def test_moe_models_run_sequence_parallel():
    source = yaml.safe_load(Path("specs/tiny_moe.yaml").read_text())
    for key in ("multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
                "qk_pos_emb_head_dim", "v_head_dim"):
        source["model"].pop(key)  # GQA + MoE (MLA under tensor parallel is another matter)
    spec_ = load_spec(source, ["train.micro_batch_size=2", "train.global_batch_size=16",
                               "parallel.tensor=2", "parallel.sequence_parallel=true"])
    ParallelDims.from_spec(spec_, 2).check_supported(spec_)


@pytest.mark.parametrize(("overrides", "message"), [
    (["parallel.expert_tensor=2"], r"runs at 1 .* or at parallel.tensor \(1"),
    (["parallel.tensor=2", "parallel.expert_tensor=4"], r"size 4 is not run"),
    (["parallel.tensor=2", "parallel.expert_tensor=2", "model.add_bias_linear=true"],
     "bias-free routed experts only"),
])
def test_expert_tensor_parallel_other_than_1_or_tensor_is_refused_by_key(overrides, message):
    spec_ = moe_spec(*overrides)
    with pytest.raises(UserError, match=message) as error:
        ParallelDims.from_spec(spec_, 4).check_supported(spec_)
    assert [p.key for p in error.value.problems] == ["parallel.expert_tensor"]


def test_expert_tensor_parallel_must_divide_the_expert_ffn():
    with pytest.raises(UserError, match=r"must divide model.moe_ffn_hidden_size \(65\)") as error:
        moe_spec("parallel.tensor=2", "parallel.expert_tensor=2", "model.moe_ffn_hidden_size=65")
    assert [p.key for p in error.value.problems] == ["parallel.expert_tensor"]


@pytest.mark.parametrize("overrides", [
    ["parallel.tensor=2", "parallel.expert_tensor=2"],
    ["parallel.tensor=2", "parallel.expert_tensor=2", "parallel.expert=2"],
    ["parallel.tensor=2", "parallel.expert_tensor=2", "parallel.sequence_parallel=true"],
])
def test_expert_tensor_parallel_equal_to_tensor_runs(overrides):
    spec_ = moe_spec(*overrides)
    ParallelDims.from_spec(spec_, 4).check_supported(spec_)


def test_multi_latent_attention_runs_tensor_parallel():
    """tiny_moe's attention is MLA: tensor parallel splits it (Megatron-Core's layout)."""
    spec_ = moe_spec("parallel.tensor=2")
    ParallelDims.from_spec(spec_, 4).check_supported(spec_)
