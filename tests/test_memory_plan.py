"""`mtp build --memory`: the plan's arithmetic against what torch really keeps.

Activations are checked against the tensors autograd saves (`saved_tensors_hooks`) on the real
model; the pipeline's alive micro-batches against the schedule's own bound; parameters against
the built model. The whole-step peaks against real multi-process runs are the benchmark's job
(benchmarks/memory_plan.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from mtp_cli import build_model, load_spec
from mtp_cli.facts.describe import describe_build
from mtp_cli.facts.stage_tensors import build_memory_plan
from mtp_cli.mtp import MTPRunState
from mtp_cli.parallel.recompute import apply_activation_checkpointing
from mtp_cli.plan.memory import activation_peak, parse_memory
from mtp_cli.plan.pipeline_order import live_output_bound
from tests.cli_helpers import SPECS, run_mtp
from tests.fake_group import engine_grad_sync

# gpt_125m's kind of layer (LayerNorm, GELU, learned positions, tied head), small
GPT_LIKE = ["model.hidden_size=96", "model.num_attention_heads=4", "model.num_layers=2",
            "model.seq_length=48", "model.vocab_size=500", "train.micro_batch_size=2",
            "train.global_batch_size=2"]


def _saved_bytes(spec, recompute: str) -> int:
    """Bytes of the tensors autograd saves in one training forward (parameters excluded)."""
    torch.manual_seed(0)
    model = build_model(spec, "cpu")
    model.mtp_state = MTPRunState()
    apply_activation_checkpointing(model, recompute)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    b, s = spec.train.micro_batch_size, spec.model.seq_length
    ids = torch.randint(0, spec.model.vocab_size, (b, s + 1))
    with model.mtp_state.activate(), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.train.bf16), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids[:, :-1], labels=ids[:, 1:], loss_mask=torch.ones(b, s))
    return sum(seen.values())


@pytest.mark.parametrize("path,overrides", [
    (SPECS / "tiny.yaml", []),
    (SPECS / "tiny.yaml", ["mtp.num_layers=3", "train.bf16=true"]),
    (SPECS / "tiny.yaml", ["mtp.num_layers=3", "train.recompute=full"]),
    (SPECS / "tiny.yaml", ["mtp.num_layers=1", "train.recompute=selective"]),
    (SPECS / "tiny.yaml", ["mtp.num_layers=2", "train.loss.chunked=true"]),
    (SPECS / "gpt_125m.yaml", [*GPT_LIKE, "mtp.num_layers=2"]),
    (SPECS / "gpt_125m.yaml", [*GPT_LIKE, "mtp.num_layers=0", "train.bf16=false"]),
])
def test_activations_match_what_autograd_saves(path, overrides):
    """Per micro-batch: the plan's activations (plus, under bf16, autocast's weight copies,
    which are saved with them) against the saved tensors of a real forward, within 5%."""
    spec = load_spec(path, overrides)
    plan = build_memory_plan(spec, 1, device="cpu")
    rank = plan.ranks[0]
    expected = rank.stages[0].activation_bytes + rank.weight_cache
    measured = _saved_bytes(spec, spec.train.recompute)
    assert measured == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("pp,vpp,count,group", [
    (2, 1, 8, None), (4, 1, 8, None), (4, 1, 2, None), (2, 2, 4, None), (4, 2, 8, None),
    (4, 2, 8, 4), (2, 3, 6, 3), (4, 2, 12, 6),
])
def test_alive_microbatches_reach_the_schedule_bound(pp, vpp, count, group):
    """Walking the pipeline order holds exactly the bound the schedule documents."""
    for rank in range(pp):
        _, alive = activation_peak([1.0] * vpp, [0.0] * vpp, pp, rank, count, group)
        assert alive == live_output_bound(pp, rank, vpp, count, group)


def test_interleaved_bound_formula():
    """min(M x vpp, 2(pp-r-1) + (vpp-1)pp + 1) with the default group size g = pp."""
    pp, vpp, count = 4, 2, 16
    for rank in range(pp):
        _, alive = activation_peak([1.0] * vpp, [0.0] * vpp, pp, rank, count, None)
        assert alive == min(count * vpp, 2 * (pp - rank - 1) + (vpp - 1) * pp + 1)


def test_parameters_follow_the_layout():
    """Pipeline ranks hold their stages' parameters (a tied copy included); tensor parallel
    halves the matrices, not the norms; FSDP2 divides everything by data parallel."""
    spec = load_spec(SPECS / "tiny.yaml", ["parallel.pipeline=2"])
    whole = build_model(load_spec(SPECS / "tiny.yaml"), "meta")
    total = sum(p.numel() for p in whole.parameters())
    plan = build_memory_plan(spec, 2)
    held = [sum(s.parameters for s in r.stages) for r in plan.ranks]
    stages = describe_build(spec).extra["stages"]  # what `mtp build` says each stage holds
    assert held == [stage["parameters"] for stage in stages]
    embedding = whole.embedding.word_embeddings.weight.numel()
    assert sum(held) == total + embedding  # the MTP stage's copy of the embedding
    assert [r.parameters for r in plan.ranks] == [4 * n for n in held]
    assert all(r.optimizer == 2 * r.parameters for r in plan.ranks)

    vectors = sum(p.numel() for p in whole.parameters() if p.ndim < 2)
    tp = build_memory_plan(load_spec(SPECS / "tiny.yaml", ["parallel.tensor=2"]), 2)
    assert tp.ranks[0].stages[0].parameters == (total - vectors) // 2 + vectors

    fsdp = build_memory_plan(load_spec(SPECS / "tiny.yaml", ["parallel.fsdp=true"]), 4)
    assert fsdp.engine == "fsdp2"
    assert fsdp.ranks[0].stages[0].parameters == round(total / 4)


@pytest.mark.parametrize("overrides,world,engine", [
    ([], 1, "allreduce"),  # one replica: no DDP, nothing to reduce
    ([], 2, "ddp"),
    (["parallel.tensor=2"], 4, "allreduce"),
    (["parallel.pipeline=2"], 4, "allreduce"),
    (["parallel.fsdp=true"], 2, "fsdp2"),
    (["parallel.fsdp=true", "parallel.tensor=2"], 4, "fsdp2"),  # FSDP2 composes with TP
])
def test_gradient_sync_and_shards_follow_the_engine(overrides, world, engine):
    """The plan's gradient synchronisation and per-rank parameters are the engine's own (built
    against the fake process group): DDP only for a whole model over several replicas, FSDP2
    over data x context with tensor / pipeline parallel inside, else the step's all-reduce."""
    spec = load_spec(SPECS / "tiny.yaml", overrides)
    plan = build_memory_plan(spec, world, device="cpu")
    sync, elements = engine_grad_sync(spec, world, rank=0)
    assert plan.engine == engine
    assert sync == {"fsdp2": "fsdp"}.get(engine, engine)
    assert sum(s.parameters for s in plan.ranks[0].stages) == pytest.approx(elements, rel=0.01)
    rank = plan.ranks[0]
    assert ("ddp_buckets" in rank.buffers) == (engine == "ddp")
    assert ("gradient_allreduce" in rank.buffers) == (engine == "allreduce" and world > 1
                                                     and plan.dims.dp_cp > 1)


def test_checkpoint_and_build_do_not_hold_whole_tensor_parallel_weights():
    """Sharded DCP state is never gathered: the checkpoint moment holds the weights and moments
    (no gradients; GELU: no view DCP must copy); meta-device construction allocates only the shards, so
    at TP4 the build (the shards, plus the largest tensor drawn whole: `randn(shape) * std`) is
    below the whole stage's fp32 weights, which the old engine built first."""
    spec = load_spec(SPECS / "gpt_125m.yaml", ["parallel.tensor=4"])
    rank = build_memory_plan(spec, 4, device="cpu").ranks[0]
    assert "checkpoint_gather" not in rank.buffers
    assert rank.phases["checkpoint"] == pytest.approx(
        rank.parameters + rank.optimizer + rank.buffers["checkpoint_write"])
    whole = build_memory_plan(load_spec(SPECS / "gpt_125m.yaml"), 1, device="cpu").ranks[0]
    largest = build_model(spec, "meta").embedding.word_embeddings.weight.numel()
    assert rank.phases["build"] == pytest.approx(rank.parameters + 4 * 2 * largest)
    assert rank.phases["build"] < whole.parameters


def test_tightest_rank_and_fit():
    spec = load_spec(SPECS / "tiny.yaml", ["parallel.pipeline=2", "mtp.num_layers=3"])
    plan = build_memory_plan(spec, 2, device_memory=parse_memory("1GiB"))
    assert plan.tightest.pp_rank == 1  # the last stage holds every head and MTP layer
    assert plan.fits is True
    small = build_memory_plan(spec, 2, device_memory=parse_memory("1MiB"))
    assert small.fits is False


def test_parse_memory_units():
    assert parse_memory("80GiB") == 80 * 2**30
    assert parse_memory("141GB") == 141 * 10**9
    assert parse_memory("1024") == 1024


def test_cli_memory_json_and_table():
    result = run_mtp("build", str(SPECS / "tiny.yaml"), "parallel.pipeline=2", "--memory",
                     "--world-size", "4", "--device-memory", "80GiB", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["parallel"] == {"data": 2, "tensor": 1, "pipeline": 2, "context": 1,
                                   "expert": 1}
    assert payload["fits"] is True
    assert [r["pp_rank"] for r in payload["ranks"]] == [0, 1]
    for rank in payload["ranks"]:
        assert rank["total"] == max(rank["phases"].values())
        assert {"parameters", "gradients", "optimizer", "activations", "weight_cache",
                "logits", "buffers", "alive_microbatches"} <= set(rank)
    table = run_mtp("build", "specs/tiny.yaml", "--memory")
    assert table.returncode == 0, table.stderr
    assert "tightest: pipeline rank 0" in table.stdout


def test_cli_memory_bad_input_exits_2():
    for args in (["--world-size", "2"], ["--memory", "--device-memory", "lots"],
                 ["--memory", "--world-size", "3"]):
        result = run_mtp("build", str(SPECS / "tiny.yaml"), *args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_dry_run_refuses_a_rank_outside_the_world(tmp_path):
    for args in (["--dry-run-rank", "8", "--world-size", "8"], ["--world-size", "8"],
                 ["--dry-run-rank", "-1", "--world-size", "8"]):
        result = run_mtp("train", str(SPECS / "tiny.yaml"), *args, cwd=tmp_path,
                         real_process=False)  # refused before anything is built
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory, no lock


@pytest.mark.slow
def test_dry_run_of_one_rank_matches_the_plan(tmp_path):
    """The last rank of TP2 x PP2 x VPP2 x DP2 (world 8) with 3 MTP depths, in one process:
    finite losses, its peak within 15% of the plan, nothing written where it ran."""
    result = run_mtp("train", str(SPECS / "tiny.yaml"), "parallel.tensor=2",
                     "parallel.pipeline=2", "parallel.virtual_pipeline=2", "mtp.num_layers=3",
                     "--dry-run-rank", "7", "--world-size", "8", cwd=tmp_path, timeout=600,
                     real_process=True)  # its own process: a fake group, the allocator flag
    assert result.returncode == 0, result.stderr
    assert "(pipeline rank 1)" in result.stdout
    ratio = float(result.stdout.split("plan / measured = ")[1].split(")")[0])
    assert 0.85 <= ratio <= 1.15
    assert "building: measured" in result.stdout  # the build moment, measured on its own
    assert "nan" not in result.stdout.lower()
    assert list(tmp_path.iterdir()) == []
