"""Pipeline point-to-point traces: sends and receives pair by post order, and the schedules
cannot deadlock under NCCL's blocking rules (`tests/pipeline_trace.py`); interleaved 1F1B runs
Megatron-Core's order and keeps no more outputs alive than its warm-up allows.

The fast cases run every pipeline rank's real schedule executor and real stage chunks in this
process, one rank after the other, against a recording fake p2p layer (receives get random
values: the order of posts does not depend on them). The gloo runs (TP2 x PP2 here, the layouts
of `test_pipeline_schedule.py` there) show the recorder sees what gloo delivers: every payload's
checksum arrives at the receive the trace pairs it with.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mtp_cli.parallel.mesh import build_mesh
from mtp_cli.parallel.pipeline_p2p import TorchP2P
from mtp_cli.parallel.pipeline_schedule import PipelineSchedule
from mtp_cli.parallel.tensor_parallel import parallelize_tensor
from mtp_cli.plan.dims import ParallelDims
from mtp_cli.plan.pipeline_order import Exchange
from tests.dist_utils import run_distributed
from tests.pipeline_cases import (  # noqa: F401
    SEQ,
    assert_same_posts,
    batches,
    mean_loss,
    one_thread,
    pipeline_spec,
    position_of,
    rank_chunks,
    run_ranks,
)
from tests.pipeline_trace import (
    Deadlock,
    RecordingP2P,
    TracedPost,
    assert_pairs_match,
    replay_nccl,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {  # name: (spec, micro-batches per step)
    "1f1b_pp2": (lambda: pipeline_spec(2), 4),
    "1f1b_pp4": (lambda: pipeline_spec(4), 6),
    "interleaved_pp2_vpp2_m4": (lambda: pipeline_spec(2, virtual=2), 4),
    "interleaved_pp4_vpp2_m8": (lambda: pipeline_spec(4, layers=8, virtual=2), 8),
    "interleaved_pp2_vpp2_m5_g3": (lambda: pipeline_spec(2, virtual=2, group=3), 5),
    "standalone_mtp_pp4": (lambda: pipeline_spec(4, depths=2, layout="Ett|tt|mm|L"), 4),
    "standalone_mtp_pp2_vpp2": (lambda: pipeline_spec(2, layout="Ett|tt|m|L"), 4),
}


@pytest.mark.parametrize("train", [True, False], ids=["step", "forward_only"])
@pytest.mark.parametrize("name", list(CASES))
def test_posts_pair_by_order_and_replay_without_deadlock_under_nccl(name, train):
    make_spec, count = CASES[name]
    traces, _ = run_ranks(make_spec(), count, train=train)
    pairs = assert_pairs_match(traces)
    assert pairs > 0
    replay_nccl(traces)


def test_standalone_mtp_stage_sends_every_depth_to_the_loss_stage():
    """`Ett|tt|mm|L` with D = 2: the MTP stage (rank 2) sends (1 + D) x s rows to the loss
    stage and gets gradients of that shape back; the decoder stages send s rows."""
    traces, _ = run_ranks(pipeline_spec(4, depths=2, layout="Ett|tt|mm|L"), 4)
    shapes = {(rank, post.peer, post.send, post.shape) for rank, trace in traces.items()
              for batch in trace for post in batch}
    assert (2, 3, True, (3 * SEQ, 2, 16)) in shapes and (3, 2, False, (3 * SEQ, 2, 16)) in shapes
    assert (3, 2, True, (3 * SEQ, 2, 16)) in shapes  # the gradient of those rows
    assert {shape for rank, peer, send, shape in shapes if {rank, peer} == {1, 2}} == \
        {(SEQ, 2, 16)}


# Megatron-Core's interleaved 1F1B (schedules.py, forward_backward_pipelining_with_interleaving
# and get_schedule_table, microbatch_group_size_per_vp_stage = pp) written out per rank:
# "F4.1" is the forward of global stage 4 (= vp_stage x pp + pp_rank) on micro-batch 1.
MEGATRON_INTERLEAVED = {
    (2, 2, 4): {
        0: "F0.0 F0.1 F2.0 F2.1 F0.2 B2.0 F0.3 B2.1 F2.2 B0.0 F2.3 B0.1 B2.2 B2.3 B0.2 B0.3",
        1: "F1.0 F1.1 F3.0 B3.0 F3.1 B3.1 F1.2 B1.0 F1.3 B1.1 F3.2 B3.2 F3.3 B3.3 B1.2 B1.3",
    },
    (4, 2, 8): {
        0: "F0.0 F0.1 F0.2 F0.3 F4.0 F4.1 F4.2 F4.3 F0.4 F0.5 F0.6 B4.0 F0.7 B4.1 F4.4 B4.2 "
           "F4.5 B4.3 F4.6 B0.0 F4.7 B0.1 B0.2 B0.3 B4.4 B4.5 B4.6 B4.7 B0.4 B0.5 B0.6 B0.7",
        1: "F1.0 F1.1 F1.2 F1.3 F5.0 F5.1 F5.2 F5.3 F1.4 B5.0 F1.5 B5.1 F1.6 B5.2 F1.7 B5.3 "
           "F5.4 B1.0 F5.5 B1.1 F5.6 B1.2 F5.7 B1.3 B5.4 B5.5 B5.6 B5.7 B1.4 B1.5 B1.6 B1.7",
        2: "F2.0 F2.1 F2.2 F2.3 F6.0 F6.1 F6.2 B6.0 F6.3 B6.1 F2.4 B6.2 F2.5 B6.3 F2.6 B2.0 "
           "F2.7 B2.1 F6.4 B2.2 F6.5 B2.3 F6.6 B6.4 F6.7 B6.5 B6.6 B6.7 B2.4 B2.5 B2.6 B2.7",
        3: "F3.0 F3.1 F3.2 F3.3 F7.0 B7.0 F7.1 B7.1 F7.2 B7.2 F7.3 B7.3 F3.4 B3.0 F3.5 B3.1 "
           "F3.6 B3.2 F3.7 B3.3 F7.4 B7.4 F7.5 B7.5 F7.6 B7.6 F7.7 B7.7 B3.4 B3.5 B3.6 B3.7",
    },
}
# min(M x vpp, 2 (pp - r - 1) + (vpp - 1) pp + 1) per rank r
LIVE_OUTPUT_BOUND = {(2, 2, 4): {0: 5, 1: 3}, (4, 2, 8): {0: 11, 1: 9, 2: 7, 3: 5}}


def _peak(order: list[str]) -> int:
    live = peak = 0
    for step in order:
        live += 1 if step[0] == "F" else -1
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("key", list(MEGATRON_INTERLEAVED))
def test_interleaved_order_is_megatron_cores_and_bounds_live_outputs(key):
    pp, vpp, count = key
    _, records = run_ranks(pipeline_spec(pp, layers=pp * vpp, virtual=vpp), count)
    for rank, expected in MEGATRON_INTERLEAVED[key].items():
        ran = [f"{kind}{stage}.{m}" for kind, stage, m in records[rank].computations]
        assert ran == expected.split(), rank
        assert records[rank].peak_live_outputs == LIVE_OUTPUT_BOUND[key][rank] == \
            _peak(expected.split()), rank
        assert records[rank].peak_live_outputs < count * vpp  # not all micro-batches


def test_1f1b_order_is_megatron_cores():
    """Without virtual stages: pp - r - 1 warm-up forwards, 1F1B, cool-down; pp - r alive."""
    expected = {0: "F0.0 F0.1 F0.2 F0.3 B0.0 F0.4 B0.1 F0.5 B0.2 B0.3 B0.4 B0.5",
                1: "F1.0 F1.1 F1.2 B1.0 F1.3 B1.1 F1.4 B1.2 F1.5 B1.3 B1.4 B1.5",
                2: "F2.0 F2.1 B2.0 F2.2 B2.1 F2.3 B2.2 F2.4 B2.3 F2.5 B2.4 B2.5",
                3: "F3.0 B3.0 F3.1 B3.1 F3.2 B3.2 F3.3 B3.3 F3.4 B3.4 F3.5 B3.5"}
    _, records = run_ranks(pipeline_spec(4), 6)
    for rank, order in expected.items():
        ran = [f"{kind}{stage}.{m}" for kind, stage, m in records[rank].computations]
        assert ran == order.split(), rank
        assert records[rank].peak_live_outputs == 4 - rank


def _post(send: bool, peer: int) -> TracedPost:
    return TracedPost(send, peer, (1,), torch.float32)


def test_replay_finds_the_deadlock_that_gloo_hides():
    """Both ranks send first, each in its own batch: gloo's sends return at once, NCCL's wait
    for the receive, which neither rank has posted. The same posts batched together run."""
    apart = {0: [[_post(True, 1)], [_post(False, 1)]], 1: [[_post(True, 0)], [_post(False, 0)]]}
    with pytest.raises(Deadlock):
        replay_nccl(apart)
    together = {0: [[_post(True, 1), _post(False, 1)]], 1: [[_post(True, 0), _post(False, 0)]]}
    assert replay_nccl(together) == 1
    one_way = {0: [[_post(True, 1)], [_post(False, 1)]], 1: [[_post(False, 0)], [_post(True, 0)]]}
    assert replay_nccl(one_way) == 2


def test_pairing_check_catches_megatrons_batched_order_at_two_ranks(monkeypatch):
    """With two pipeline ranks the previous and next peer are one rank; Megatron's batched
    order (send_prev, recv_prev, send_next, recv_next) pairs a gradient with an activation of
    the same shape, which only the message check sees."""
    def megatron_batched_order(self):
        ordered = (("send_prev", self.send_prev), ("recv_prev", self.recv_prev),
                   ("send_next", self.send_next), ("recv_next", self.recv_next))
        return [(slot, message) for slot, message in ordered if message is not None]

    monkeypatch.setattr(Exchange, "slots", megatron_batched_order)
    traces, _ = run_ranks(pipeline_spec(2, virtual=2), 4)
    with pytest.raises(AssertionError, match="gradient=True"):
        assert_pairs_match(traces)


# --- a real gloo run ---------------------------------------------------------------------------
GLOO_SPECS = ({"pipeline": 2, "tensor": 2}, {"pipeline": 2, "tensor": 2, "virtual": 2})


def _gloo_steps(rank: int, world: int) -> None:
    """TP2 x PP2, without and with virtual stages: a step and a forward pass each, recorded at
    the pipeline level with payload checksums; rank 0 checks every tensor-parallel rank's
    pipeline."""
    mesh = build_mesh(ParallelDims(world_size=world, dp=1, tp=2, pp=2), "cpu")
    pp_rank, tp_rank = mesh.mesh.get_local_rank("pp"), mesh.mesh.get_local_rank("tp")
    for arguments in GLOO_SPECS:
        spec = pipeline_spec(**arguments)
        position = position_of(spec, pp_rank)
        chunks = rank_chunks(spec, position)
        for chunk in chunks:
            parallelize_tensor(chunk, mesh.group("tp"))
            chunk.groups = mesh.model_groups()
        recorder = RecordingP2P(TorchP2P(mesh.group("pp")), checksums=True)
        schedule = PipelineSchedule(chunks, position, recorder)
        schedule.step(batches(4), mean_loss(4))
        schedule.forward_only(batches(4), mean_loss(4))
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (tp_rank, pp_rank, recorder.trace))
        if rank == 0:
            _check_gloo_traces(spec, gathered)


def _check_gloo_traces(spec, gathered: list) -> None:
    fake = [run_ranks(spec, 4, train=train)[0] for train in (True, False)]
    for tp_rank in (0, 1):
        traces = {p: trace for t, p, trace in gathered if t == tp_rank}
        assert assert_pairs_match(traces) > 0  # checksums: each payload reached its receive
        replay_nccl(traces)
        for p, trace in traces.items():  # what the one-process fake records is what gloo ran
            assert_same_posts(trace, fake[0][p] + fake[1][p])


@pytest.mark.slow
@pytest.mark.distributed
def test_gloo_delivers_what_the_trace_pairs_at_tp2_pp2():
    run_distributed(_gloo_steps, 4)
