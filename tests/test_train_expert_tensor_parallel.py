"""Expert tensor parallel (gloo, real processes).

An MoE layer at TP2 = ETP2 in two processes, with and without sequence parallel, gives the
single-device layer's outputs and input gradients, each rank's expert shards the single-device
gradients' shards, and its router the single-device router gradient (summed over the ranks
under sequence parallel, where each rank routed its own slice).

End to end: `mtp train` of tiny_moe (MLA + MoE,
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

import functools
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader

from mtp_cli import build_model, load_spec
from mtp_cli.parallel.tensor_parallel import parallelize_tensor
from tests.cli_helpers import SPECS, run_mtp
from tests.dist_utils import run_distributed
from tests.expert_helpers import DISPATCH_SPEC
from tests.train_helpers import assert_same_training, checkpoint_dir, metrics

pytestmark = [pytest.mark.distributed]
LAYER = "decoder.layers.1.mlp."


def _check_layer(rank: int, world: int) -> None:
    spec = load_spec(DISPATCH_SPEC)
    for sp in (False, True):
        reference = build_model(spec)
        model = build_model(spec)
        plan = parallelize_tensor(model, dist.group.WORLD, sequence_parallel=sp,
                                  expert_tensor=True)
        assert plan.rule(LAYER + "experts.local_experts.3.linear_fc2.weight") is not None
        hidden = torch.randn(8, 2, 16, generator=torch.Generator().manual_seed(3))
        ref_hidden = hidden.clone().requires_grad_(True)
        ref_out = reference.decoder.layers["1"].mlp(ref_hidden)
        ref_out.square().sum().backward()
        mine = (hidden.chunk(world)[rank] if sp else hidden).clone().requires_grad_(True)
        out = model.decoder.layers["1"].mlp(mine)
        out.square().sum().backward()
        expected = ref_out.chunk(world)[rank] if sp else ref_out
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        ref_grad = ref_hidden.grad.chunk(world)[rank] if sp else ref_hidden.grad
        torch.testing.assert_close(mine.grad, ref_grad, rtol=1e-5, atol=1e-6)
        ref_params = dict(reference.named_parameters())
        for name, param in model.named_parameters():
            if not name.startswith(LAYER + "experts.") and not name.startswith(LAYER + "router"):
                continue
            grad = param.grad
            if sp and not plan.is_sharded(name):  # the router saw this rank's slice only
                grad = grad.clone()
                dist.all_reduce(grad)
            want = plan.shard_like_parameter(name, ref_params[name].grad)
            scale = want.abs().max().item()  # tiny initial weights: tolerances relative to it
            assert scale > 0, name
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_an_moe_layer_at_tp2_etp2_gives_the_single_device_layer():
    run_distributed(_check_layer, 2)

STEPS = 5
OVERRIDES = [
    "model.num_layers=2", "model.moe_layer_freq=[0, 1]", "model.seq_length=32",
    "model.moe_z_loss_coeff=1.0e-3", f"train.steps={STEPS}", "train.micro_batch_size=2",
    "train.global_batch_size=4", "train.warmup_steps=1", "train.eval_interval=0",
    "train.log_interval=1", "train.adam_eps=1e-6", "train.lr=1e-3", "checkpoint.interval=3",
    "checkpoint.keep_last=2", "logging.tensorboard=false",
]
KEYS = ("lm_loss", "mtp_1_loss", "mtp_2_loss", "seq_load_balancing_loss", "z_loss",
        "load_imbalance", "grad_norm")  # the norm: each expert row counted once
_assert_same_run = functools.partial(assert_same_training, keys=KEYS, steps=STEPS)
ETP = ["parallel.expert=2", "parallel.tensor=2", "parallel.expert_tensor=2",
       "parallel.sequence_parallel=true"]


def _train(run_dir: Path, nproc: int, *extra: str) -> None:
    done = run_mtp("train", str(SPECS / "tiny_moe.yaml"), *OVERRIDES, *extra,
                   "--run-dir", str(run_dir), "--nproc", str(nproc), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("etp")
    _train(root / "single", 1)
    _train(root / "etp2", 4, *ETP)
    return root


@pytest.mark.slow
def test_ep2_tp2_etp2_gives_the_single_process_run(runs):
    _assert_same_run(runs / "single", runs / "etp2")
    first = metrics(runs / "etp2")[0][0]
    assert first["seq_load_balancing_loss"] > 0 and first["z_loss"] > 0


@pytest.mark.slow
def test_expert_weights_are_stored_at_global_shapes_split_over_the_tensor_ranks(runs):
    """linear_fc1 `[gate; up]` as four row chunks (each half split over the two tensor ranks),
    linear_fc2 as two column chunks; no rank gathered a whole expert."""
    checkpoint = checkpoint_dir(runs / "etp2", STEPS)
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


@pytest.mark.slow
def test_an_etp2_checkpoint_resumes_at_one_process(runs, tmp_path):
    """DCP reshards the step-3 EP2 x ETP2 checkpoint to EP1 x ETP1: steps 4 and 5 give the
    losses and final parameters of the run that never stopped."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(runs / "etp2", run_dir)
    (run_dir / "checkpoints" / "latest").write_text("step_0000003\n")
    _train(run_dir, 1)
    _assert_same_run(runs / "single", run_dir)


@pytest.mark.parametrize(("overrides", "world"), [
    (["parallel.tensor=2", "parallel.expert_tensor=2"], 2),
    (["parallel.tensor=2", "parallel.expert_tensor=2", "parallel.expert=2"], 4)])
def test_memory_plan_counts_what_an_expert_tensor_parallel_rank_holds(overrides, world):
    """`mtp build --memory`'s per-rank parameters equal what the engine's rank 0 holds (built
    against torch's fake process group): the routed experts split by EP and by ETP."""
    from mtp_cli.facts.stage_tensors import build_memory_plan
    from tests.fake_group import engine_grad_sync

    spec = load_spec(SPECS / "tiny_moe.yaml", overrides)
    plan = build_memory_plan(spec, world, device="cpu")
    _, elements = engine_grad_sync(spec, world, rank=0)
    assert sum(s.parameters for s in plan.ranks[0].stages) == elements
