"""Expert tensor parallel end to end (gloo, real processes): `mtp train` of tiny_moe (MLA + MoE,
two MoE MTP depths) at EP2 x TP2 with `parallel.expert_tensor=2` (four processes: each routed
expert's linear_fc1 column- and linear_fc2 row-parallel over the tensor ranks, under sequence
parallel as Megatron-Core requires for MoE with tensor parallel, so the dispatcher all-gathers the
routed tokens over the tensor group and reduce-scatters the experts' outputs) gives, step by
step, the single-process run's lm loss, each MTP depth's loss and the aux losses, and the same
final parameters, to 1e-5. Its checkpoint stores every expert weight at its global shape as two
tensor-parallel chunks, passes `inspect-ckpt --strict`, and its step-3 checkpoint resumes at one
process (EP1 x ETP1) with the losses of the run that never stopped.

Adam's eps 1e-6 and lr 1e-3 as in tests/test_train_mla_tensor_parallel.py: tensor parallel
reorders sums (~1e-7 relative), which Adam's first steps amplify for near-zero gradients."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from torch.distributed.checkpoint import FileSystemReader

from tests.ckpt_helpers import load_whole_dcp
from tests.cli_helpers import SPECS, run_mtp

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 5
OVERRIDES = [
    "model.num_layers=2", "model.moe_layer_freq=[0, 1]", "model.seq_length=32",
    "model.moe_z_loss_coeff=1.0e-3", f"train.steps={STEPS}", "train.micro_batch_size=2",
    "train.global_batch_size=4", "train.warmup_steps=1", "train.eval_interval=0",
    "train.log_interval=1", "train.adam_eps=1e-6", "train.lr=1e-3", "checkpoint.interval=3",
    "checkpoint.keep_last=2", "logging.tensorboard=false",
]
KEYS = ("lm_loss", "mtp_1_loss", "mtp_2_loss", "seq_load_balancing_loss", "z_loss",
        "load_imbalance")
ETP = ["parallel.expert=2", "parallel.tensor=2", "parallel.expert_tensor=2",
       "parallel.sequence_parallel=true"]


def _train(run_dir: Path, nproc: int, *extra: str) -> None:
    done = run_mtp("train", str(SPECS / "tiny_moe.yaml"), *OVERRIDES, *extra,
                   "--run-dir", str(run_dir), "--nproc", str(nproc), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def _lines(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "split" not in r]


def _checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


def _assert_same_run(reference: Path, run_dir: Path, tolerance: float = 1e-5) -> None:
    ref, got = _lines(reference), _lines(run_dir)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got, strict=True):
        for key in KEYS:
            assert abs(a[key] - b[key]) <= tolerance, (a["step"], key, a[key], b[key])
    ref_model = load_whole_dcp(_checkpoint(reference, STEPS))["model"]
    model = load_whole_dcp(_checkpoint(run_dir, STEPS))["model"]
    assert sorted(ref_model) == sorted(model)  # every expert, by its global index
    for name, value in ref_model.items():
        assert value.shape == model[name].shape, name  # canonical global shapes
        diff = (value.float() - model[name].float()).abs().max().item()
        assert diff <= tolerance, (name, diff)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("etp")
    _train(root / "single", 1)
    _train(root / "etp2", 4, *ETP)
    return root


def test_ep2_tp2_etp2_gives_the_single_process_run(runs):
    _assert_same_run(runs / "single", runs / "etp2")
    first = _lines(runs / "etp2")[0]
    assert first["seq_load_balancing_loss"] > 0 and first["z_loss"] > 0


def test_expert_weights_are_stored_at_global_shapes_split_over_the_tensor_ranks(runs):
    """linear_fc1 `[gate; up]` as four row chunks (each half split over the two tensor ranks),
    linear_fc2 as two column chunks; no rank gathered a whole expert."""
    checkpoint = _checkpoint(runs / "etp2", STEPS)
    metadata = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    experts = {k: v for k, v in metadata.items()
               if k.startswith("model.") and ".local_experts." in k}
    assert len(experts) == 2 * 8 * 3  # fc1 and fc2 of 8 experts, decoder layer 2 + 2 MTP layers
    ffn, hidden = 64, 64
    for key, entry in experts.items():
        sizes = sorted(list(c.sizes) for c in entry.chunks)
        if key.endswith("linear_fc1.weight"):
            assert list(entry.size) == [2 * ffn, hidden], key
            assert sizes == [[ffn // 2, hidden]] * 4, key
        else:
            assert list(entry.size) == [hidden, ffn], key
            assert sizes == [[hidden, ffn // 2]] * 2, key
    inspected = run_mtp("inspect-ckpt", str(runs / "etp2"), "--strict")
    assert inspected.returncode == 0, inspected.stdout + inspected.stderr


def test_an_etp2_checkpoint_resumes_at_one_process(runs, tmp_path):
    """DCP reshards the step-3 EP2 x ETP2 checkpoint to EP1 x ETP1: steps 4 and 5 give the
    losses and final parameters of the run that never stopped."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(runs / "etp2", run_dir)
    (run_dir / "checkpoints" / "latest").write_text("step_0000003\n")
    _train(run_dir, 1)
    _assert_same_run(runs / "single", run_dir)
