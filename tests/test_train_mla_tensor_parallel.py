"""Multi-latent attention under tensor (and sequence) parallel, against one process.

Megatron-Core's layout of MLA (its TE spec): the up projections split by heads, the down
projections and the latent norms whole on every rank, the decoupled RoPE key shared by the heads
of every rank, `linear_proj` row-parallel. Checked at two levels:

* one step in real gloo processes (`tests.tp_cases`): per-token loss, MTP tracker, every gradient
  gathered to full, the gradient norm (each replicated weight counted once), the state dict and
  the logits equal the single-process model's, with and without sequence parallel, with and
  without query compression, YaRN active;
* `mtp train` end to end: an MLA + MoE model at TP2 and a dense MLA model at TP2 with sequence
  parallel give the single-process runs' losses per step and final parameters to 1e-5; the TP2
  checkpoint stores canonical shapes as shards, passes `inspect-ckpt --strict` and resumes at TP1
  with the next step's losses equal;
* `mtp build --memory`: per-rank parameters equal what the engine's rank holds.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import yaml
from torch.distributed.checkpoint import FileSystemReader

from tests.cli_helpers import SPECS, run_mtp
from tests.dist_utils import run_distributed
from tests.tp_cases import check_case
from tests.train_helpers import assert_same_training, checkpoint_dir


@pytest.mark.parametrize(("overrides", "world"), [
    (["parallel.tensor=2"], 2), (["parallel.tensor=2", "parallel.expert=2"], 4)])
def test_memory_plan_counts_what_a_tensor_parallel_rank_holds(overrides, world):
    """`mtp build --memory`'s per-rank parameters equal what the engine's rank 0 holds (built
    against torch's fake process group): MLA's down projections and the routers whole, the rest
    of the attention split."""
    from mtp_cli import load_spec
    from mtp_cli.facts.stage_tensors import build_memory_plan
    from tests.fake_group import engine_grad_sync

    spec = load_spec(SPECS / "tiny_moe.yaml", overrides)
    plan = build_memory_plan(spec, world, device="cpu")
    _, elements = engine_grad_sync(spec, world, rank=0)
    assert sum(s.parameters for s in plan.ranks[0].stages) == elements


def _worker(rank: int, world_size: int, cases: list[tuple]) -> None:
    for case in cases:
        check_case(*case)


@pytest.mark.distributed
def test_mla_tp2_step_matches_single_process():
    """D = 2; tied and untied, with and without sequence parallel, with and without query
    compression (each value of each in two of four cases)."""
    cases = [("mla", 2, tied, sp, {} if compress else {"q_lora_rank": None})
             for tied, sp, compress in ((False, False, True), (True, True, True),
                                        (False, True, False), (True, False, False))]
    run_distributed(_worker, 2, cases)


# --- mtp train end to end ------------------------------------------------------------------------
STEPS = 5
OVERRIDES = [
    "model.num_layers=2", "model.seq_length=32",
    f"train.steps={STEPS}", "train.micro_batch_size=2", "train.global_batch_size=4",
    "train.warmup_steps=1", "train.eval_interval=0", "train.log_interval=1",
    "train.adam_eps=1e-6", "train.lr=1e-3", "checkpoint.interval=3", "checkpoint.keep_last=2",
    "logging.tensorboard=false",
]
KEYS = ("lm_loss", "mtp_1_loss", "mtp_2_loss")
_assert_same_run = functools.partial(assert_same_training, keys=KEYS, steps=STEPS)
TP_SHARDED = ("linear_q_up_proj", "linear_kv_up_proj", "linear_proj")
DUPLICATED = ("linear_q_down_proj", "linear_kv_down_proj", "q_layernorm", "kv_layernorm")


def _train(run_dir: Path, nproc: int, *extra: str, spec: Path = SPECS / "tiny_moe.yaml"
           ) -> None:
    done = run_mtp("train", str(spec), *OVERRIDES, *extra,
                   "--run-dir", str(run_dir), "--nproc", str(nproc), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _assert_stored_as_megatron_lays_out(checkpoint: Path) -> None:
    """The up projections and linear_proj as two TP chunks tiling the global tensor; the down
    projections and latent norms as one whole chunk (written once)."""
    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    seen = set()
    for key, entry in metadata.items():
        if not key.startswith("model.") or ".self_attention." not in key:
            continue
        leaf = key.split(".self_attention.")[1].split(".")[0]
        sizes = [list(c.sizes) for c in entry.chunks]
        if leaf in TP_SHARDED:
            dim = 1 if leaf == "linear_proj" else 0
            assert len(sizes) == 2 and all(s[dim] * 2 == entry.size[dim] for s in sizes), key
        elif leaf in DUPLICATED:
            assert sizes == [list(entry.size)], key
        seen.add(leaf)
    assert seen == {*TP_SHARDED, *DUPLICATED}, seen


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mla_tp")
    _train(root / "single", 1, "model.moe_layer_freq=[0, 1]")
    _train(root / "tp2", 2, "model.moe_layer_freq=[0, 1]", "parallel.tensor=2")
    return root


@pytest.mark.slow
@pytest.mark.distributed
def test_mla_moe_tp2_gives_the_single_process_run(moe_runs):
    """MLA + MoE layers (first dense) with two MoE MTP depths at TP2, no sequence parallel
    (MoE under sequence parallel is refused)."""
    _assert_same_run(moe_runs / "single", moe_runs / "tp2",
                     keys=(*KEYS, "seq_load_balancing_loss", "load_imbalance"))
    _assert_stored_as_megatron_lays_out(checkpoint_dir(moe_runs / "tp2", STEPS))
    inspected = run_mtp("inspect-ckpt", str(moe_runs / "tp2"), "--strict")
    assert inspected.returncode == 0, inspected.stdout + inspected.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_an_mla_tp2_checkpoint_resumes_at_tp1(moe_runs, tmp_path):
    """DCP reshards the step-3 TP2 checkpoint to one process: steps 4 and 5 give the losses
    of the runs that never stopped."""
    run_dir = tmp_path / "tp1"
    shutil.copytree(moe_runs / "tp2", run_dir)
    (run_dir / "checkpoints" / "latest").write_text("step_0000003\n")
    _train(run_dir, 1, "model.moe_layer_freq=[0, 1]")
    _assert_same_run(moe_runs / "single", run_dir)


@pytest.mark.slow
@pytest.mark.distributed
def test_dense_mla_tp2_sequence_parallel_gives_the_single_process_run(tmp_path):
    """tiny_moe without its MoE keys: MLA in every layer, the sequence split between the TP
    regions (the down projections and latent norms see this rank's tokens only)."""
    source = yaml.safe_load((SPECS / "tiny_moe.yaml").read_text())
    source["model"] = {k: v for k, v in source["model"].items() if not k.startswith("moe_")
                       and k != "num_moe_experts"}
    spec = tmp_path / "dense_mla.yaml"
    spec.write_text(yaml.safe_dump(source))
    _train(tmp_path / "single", 1, spec=spec)
    _train(tmp_path / "tp2_sp", 2, "parallel.tensor=2", "parallel.sequence_parallel=true",
           spec=spec)
    _assert_same_run(tmp_path / "single", tmp_path / "tp2_sp")
