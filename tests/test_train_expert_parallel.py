"""Expert parallel end to end (gloo, real processes): `mtp train` of an MLA + MoE model with two
MTP depths at EP2 (two processes), EP2 x DP2 and EP2 x PP2 (four; the MoE MTP layers on the last
stage) gives, step by step, the single-process run's lm loss, each MTP depth's loss, the aux
losses and the load imbalance, and the same final parameters, to 1e-5; so does a GQA + MoE model
at EP2 x TP2 (MLA under TP: tests/test_train_mla_tensor_parallel.py); a checkpoint written at
EP2 resumes at EP1 and at EP4 on the same path.

The TP case turns off the QK norms and uses Adam's eps 1e-6 and lr 1e-3: tensor parallel
reorders sums (~1e-7 relative), which Adam's first steps turn into visible differences for
near-zero gradient elements (see test_train_model_parallel); the dense model drifts the same."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.cli_helpers import SPECS
from tests.expert_helpers import MLA_KEYS, assert_same_ep_run, train_ep
from tests.train_helpers import metrics

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ep")
    train_ep(root / "single", nproc=1, expert=1)
    train_ep(root / "ep2", nproc=2, expert=2)
    return root


def test_ep2_gives_the_single_process_run(runs):
    assert_same_ep_run(runs / "single", runs / "ep2")
    first = metrics(runs / "ep2")[0][0]
    assert first["seq_load_balancing_loss"] > 0 and first["z_loss"] > 0
    assert first["load_imbalance"] >= 1.0


def test_an_ep2_checkpoint_exports_like_the_single_process_one(runs, tmp_path):
    """Issue 15 at EP2: `mtp export` of the expert-sharded checkpoint, with no process group,
    writes the same files, names and shapes as the single-process run's (DeepseekV3ForCausalLM,
    every routed expert under its global index), and values within the runs' parity tolerance."""
    from mtp_cli.hf.export import export_checkpoint
    from tests.hf_models import read_safetensors_dir

    export_checkpoint(runs / "single", tmp_path / "single")
    export_checkpoint(runs / "ep2", tmp_path / "ep2")
    single, sharded = (read_safetensors_dir(tmp_path / name) for name in ("single", "ep2"))
    assert sorted(single) == sorted(sharded)
    assert any(".mlp.experts.3." in name for name in sharded)  # the second rank's experts
    for name, value in single.items():
        assert value.shape == sharded[name].shape and value.dtype == sharded[name].dtype, name
        assert (value - sharded[name]).abs().max().item() <= 1e-5, name
    assert (tmp_path / "single" / "config.json").read_text() == \
        (tmp_path / "ep2" / "config.json").read_text()


def test_ep2_dp2_gives_the_single_process_run(runs):
    train_ep(runs / "ep2dp2", nproc=4, expert=2)
    assert_same_ep_run(runs / "single", runs / "ep2dp2")


@pytest.mark.parametrize(("nproc", "expert"), [(1, 1), (4, 4)])
def test_an_ep2_checkpoint_resumes_at_another_expert_parallel_size(runs, tmp_path, nproc,
                                                                    expert):
    run_dir = tmp_path / f"ep{expert}"
    shutil.copytree(runs / "ep2", run_dir)
    (run_dir / "checkpoints/latest").write_text("step_0000003\n")
    train_ep(run_dir, nproc=nproc, expert=expert)
    assert_same_ep_run(runs / "single", run_dir)


def test_ep2_pp2_with_the_mtp_layers_on_the_last_stage_gives_the_single_process_run(runs):
    train_ep(runs / "ep2pp2", 4, 2, "parallel.pipeline=2")
    assert_same_ep_run(runs / "single", runs / "ep2pp2")


TP_SAFE = ["model.qk_layernorm=false", "model.num_query_groups=2", "train.adam_eps=1e-6",
           "train.lr=1e-3"]


def test_ep2_tp2_gives_the_single_process_run(tmp_path):
    source = yaml.safe_load((SPECS / "tiny_moe.yaml").read_text())
    for key in MLA_KEYS:
        source["model"].pop(key)
    spec = tmp_path / "gqa_moe.yaml"
    spec.write_text(yaml.safe_dump(source))
    train_ep(tmp_path / "single", 1, 1, *TP_SAFE, spec=spec)
    train_ep(tmp_path / "ep2tp2", 4, 2, *TP_SAFE, "parallel.tensor=2", spec=spec)
    assert_same_ep_run(tmp_path / "single", tmp_path / "ep2tp2")
