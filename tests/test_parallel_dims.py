"""Parallel sizes: data-parallel size derived from the world size, errors when nothing fits."""

from __future__ import annotations

import pytest

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


def test_fsdp_and_te_are_refused_with_model_parallel():
    dims = ParallelDims.from_spec(spec("parallel.pipeline=2"), 4)
    with pytest.raises(UserError, match=r"parallel\.fsdp composes with data parallel only"):
        dims.check_supported(spec("parallel.pipeline=2", "parallel.fsdp=true"))
    dims.check_supported(spec("parallel.pipeline=2"))  # model parallel itself is supported
    ParallelDims.from_spec(spec(), 4).check_supported(spec("parallel.fsdp=true"))


def test_launcher_checks_flags_before_anything_else(tmp_path):
    from mtp_cli.launch.launcher import LaunchOptions, plan_launch

    with pytest.raises(UserError, match="--nnodes > 1 needs --rdzv-endpoint"):
        plan_launch(spec(), LaunchOptions(run_dir=tmp_path / "run", nnodes=2))
    with pytest.raises(UserError, match=r"--node-rank 2 is not in \[0, --nnodes\)"):
        plan_launch(spec(), LaunchOptions(run_dir=tmp_path / "run", nnodes=2, node_rank=2,
                                          rdzv_endpoint="localhost:1"))
    assert not (tmp_path / "run").exists()
