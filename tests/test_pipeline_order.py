"""The pipeline order over a grid of sizes: for every valid (pp, vpp, M, g) the executor's posts
pair by order and replay under NCCL's rules without deadlock, every received tensor is used, and
interleaved 1F1B never holds more outputs than min(M x vpp, 2 (pp - r - 1) + (vpp - 1) g + 1).
Stage chunks are stand-ins of the right shapes, so hundreds of schedules run in seconds."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from mtp_cli.parallel.pipeline_position import PipelinePosition
from mtp_cli.parallel.pipeline_schedule import PipelineSchedule
from mtp_cli.plan.pipeline_order import check_group_size, interleaved_1f1b
from mtp_cli.plan.stages import Stage, StagePlan
from tests.pipeline_cases import one_thread  # noqa: F401
from tests.pipeline_trace import RecordingP2P, assert_pairs_match, replay_nccl

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ, MICRO, HIDDEN = 3, 2, 4


class StandIn(nn.Module):
    """A stage of the GPT call signature: [s, b, h] hidden states (`rows` x s of them from the
    MTP stage on), or the per-token loss [b, s] on the last stage."""

    def __init__(self, last: bool, rows: int):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(1.5))
        self.last, self.rows = last, rows

    def forward(self, input_ids, position_ids, *, labels=None, loss_mask=None,
                packed_seq_params=None, hidden_states=None):
        batch, seq = input_ids.shape
        hidden = torch.ones(seq, batch, HIDDEN) if hidden_states is None else hidden_states[:seq]
        hidden = hidden * self.weight
        return hidden.sum(-1).t() if self.last else hidden.repeat(self.rows, 1, 1)


class Batch:
    input_ids = position_ids = labels = torch.zeros(MICRO, SEQ, dtype=torch.long)
    loss_mask = packed_seq_params = None


def run(pp: int, vpp: int, count: int, group: int | None, *, train: bool, mtp_stage=None):
    """Every rank's schedule; returns the traces and each rank's peak of live outputs."""
    stages = tuple(Stage(pp_rank=i % pp, vp_stage=i // pp if vpp > 1 else None,
                         mtp_layers=int(i == mtp_stage)) for i in range(pp * vpp))
    plan = StagePlan(pp, vpp if vpp > 1 else None, 1 if mtp_stage is not None else 0, stages)
    traces, peaks = {}, {}
    for rank in range(pp):
        position = PipelinePosition(plan, rank, (SEQ, MICRO, HIDDEN))
        carries_mtp = [mtp_stage is not None and position.stage_index(c) >= mtp_stage
                       for c in range(vpp)]
        chunks = [StandIn(position.is_last_stage(c), 2 if carries_mtp[c] else 1)
                  for c in range(vpp)]
        recorder = RecordingP2P(seed=rank)
        schedule = PipelineSchedule(chunks, position, recorder, microbatch_group_size=group)
        (schedule.step if train else schedule.forward_only)(
            [Batch()] * count, lambda loss, batch: loss.sum())
        traces[rank], peaks[rank] = recorder.trace, schedule.last_record.peak_live_outputs
        expected = count * vpp
        assert len(schedule.last_record.computations) == expected * (2 if train else 1)
    return traces, peaks


def valid_sizes():
    for pp, vpp, count in itertools.product((2, 3, 4), (1, 2, 3), range(1, 9)):
        if vpp == 1:
            yield pp, vpp, count, None
            continue
        for group in range(pp, count + 1):
            if not 0 < count % group < pp:
                yield pp, vpp, count, group


def test_every_valid_schedule_pairs_replays_and_bounds_live_outputs():
    checked = 0
    for pp, vpp, count, group in valid_sizes():
        traces, peaks = run(pp, vpp, count, group, train=True)
        assert_pairs_match(traces)
        replay_nccl(traces)
        for rank, peak in peaks.items():
            bound = min(count, pp - rank) if vpp == 1 else \
                min(count * vpp, 2 * (pp - rank - 1) + (vpp - 1) * group + 1)
            assert peak == bound, (pp, vpp, count, group, rank)
        checked += 1
    assert checked == 94  # 24 without virtual stages, 70 interleaved


@pytest.mark.parametrize("pp,vpp", [(2, 1), (3, 1), (2, 2), (3, 2), (4, 3)])
def test_forward_only_runs_any_count_of_at_least_pp(pp, vpp):
    """Validation runs eval_steps x M micro-batches: any count >= pp (a last group smaller
    than pp is merged into the one before it)."""
    for count in range(pp if vpp > 1 else 1, 12):
        traces, peaks = run(pp, vpp, count, None, train=False)
        assert_pairs_match(traces)
        replay_nccl(traces)
        assert set(peaks.values()) == {0}  # nothing is kept for a backward


@pytest.mark.parametrize("mtp_stage", [2, 6])
def test_a_stage_with_mtp_rows_sends_them_on(mtp_stage):
    """(1+D) x s rows leave the MTP stage, on to every later stage, with virtual stages too."""
    traces, _ = run(4, 2, 8, None, train=True, mtp_stage=mtp_stage)
    assert_pairs_match(traces)
    replay_nccl(traces)
    rows = {post.shape[0] for trace in traces.values() for batch in trace for post in batch
            if post.message.boundary >= mtp_stage}
    assert rows == {2 * SEQ}


def test_group_size_rules_are_megatron_cores():
    check_group_size(2, 5, 3)
    with pytest.raises(ValueError, match=r"must range in \[pipeline=2, M=4\]"):
        check_group_size(2, 4, 5)
    with pytest.raises(ValueError, match=r"must range in"):
        check_group_size(4, 8, 3)
    with pytest.raises(ValueError, match=r"it is 1"):
        check_group_size(2, 4, 3)
    with pytest.raises(ValueError, match="at least pipeline"):
        interleaved_1f1b(4, 0, 2, 3, forward_only=True)
