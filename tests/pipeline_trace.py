"""Point-to-point traces of pipeline schedules: a recording p2p layer, the pairing check, and a
replay under NCCL's blocking rules.

A trace is, per pipeline rank, the ordered batches that rank posted; each post is a send to or a
receive from one peer, with the shape and dtype on the wire and the message it carries.

NCCL's rules, as replayed here: posts carry no tags; the k-th send from A to B is matched with
B's k-th receive from A; a rank posts a batch, then blocks until every post in it is matched
(a send blocks until its receive is posted, and a receive until its send is); only then does it
post its next batch. gloo lets a send return before the receive exists, so a schedule can pass
on gloo and hang on NCCL; the replay shows it does not.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mtp_cli.parallel.pipeline_p2p import PipelineP2P, Post
from mtp_cli.plan.pipeline_order import Message


@dataclass(frozen=True)
class TracedPost:
    send: bool
    peer: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    message: Message | None = None
    checksum: float | None = None  # of the payload (sends) or of what arrived (receives)


Trace = list[list[TracedPost]]  # one rank's batches, in posting order


@dataclass
class RecordingP2P:
    """Records every batch, then hands it to `inner`; without `inner` it fills receive buffers
    with seeded random values (a fake peer, for running one rank's schedule alone)."""

    inner: PipelineP2P | None = None
    checksums: bool = False
    seed: int = 0
    trace: Trace = field(default_factory=list)

    def post(self, batch: Sequence[Post]) -> None:
        if self.inner is not None:
            self.inner.post(batch)
        else:
            generator = torch.Generator().manual_seed(self.seed + len(self.trace))
            for post in batch:
                if not post.send:
                    post.tensor.copy_(torch.randn(post.tensor.shape, generator=generator))
        self.trace.append([TracedPost(
            p.send, p.peer, tuple(p.tensor.shape), p.tensor.dtype, p.message,
            float(p.tensor.double().sum()) if self.checksums else None) for p in batch])


def _stream(traces: Mapping[int, Trace], source: int, target: int, send: bool
            ) -> list[TracedPost]:
    """Every send from source to target (or every receive by target from source), in order."""
    owner, peer = (source, target) if send else (target, source)
    return [p for batch in traces[owner] for p in batch if p.send == send and p.peer == peer]


def assert_pairs_match(traces: Mapping[int, Trace]) -> int:
    """The k-th send from A to B and B's k-th receive from A agree in shape, dtype and message
    (and payload checksum when recorded); returns how many pairs were checked."""
    pairs = 0
    for source in traces:
        for target in traces:
            sends = _stream(traces, source, target, send=True)
            recvs = _stream(traces, source, target, send=False)
            assert len(sends) == len(recvs), (source, target, len(sends), len(recvs))
            for k, (sent, got) in enumerate(zip(sends, recvs, strict=True)):
                where = f"message {k} from rank {source} to rank {target}"
                assert (sent.shape, sent.dtype) == (got.shape, got.dtype), (where, sent, got)
                assert sent.message == got.message, (where, sent.message, got.message)
                if sent.checksum is not None and got.checksum is not None:
                    assert sent.checksum == got.checksum, (where, sent.checksum, got.checksum)
            pairs += len(sends)
    return pairs


class Deadlock(AssertionError):
    pass


def replay_nccl(traces: Mapping[int, Trace]) -> int:
    """Replay the traces under NCCL's rules (module docstring); raises `Deadlock` when every
    unfinished rank waits on a post that can never be matched. Returns the rounds it took."""
    # ordinal of every post among its rank's posts to/from the same peer in the same direction
    ordinals: dict[int, list[list[int]]] = {}
    for rank, trace in traces.items():
        seen: Counter[tuple[bool, int]] = Counter()
        ordinals[rank] = []
        for batch in trace:
            row = []
            for post in batch:
                row.append(seen[(post.send, post.peer)])
                seen[(post.send, post.peer)] += 1
            ordinals[rank].append(row)
    current = dict.fromkeys(traces, 0)  # the batch each rank has posted and waits on
    posted: Counter[tuple[int, bool, int]] = Counter()  # (rank, send, peer) -> posts made

    def post_batch(rank: int) -> None:
        if current[rank] < len(traces[rank]):
            for post in traces[rank][current[rank]]:
                posted[(rank, post.send, post.peer)] += 1

    for rank in traces:
        post_batch(rank)
    rounds = 0
    while any(current[r] < len(traces[r]) for r in traces):
        rounds += 1
        done = [r for r in traces if current[r] < len(traces[r]) and all(
            posted[(post.peer, not post.send, r)] > ordinal
            for post, ordinal in zip(traces[r][current[r]], ordinals[r][current[r]],
                                     strict=True))]
        if not done:
            blocked = {r: traces[r][current[r]] for r in traces if current[r] < len(traces[r])}
            raise Deadlock(f"no rank can go on; waiting: {blocked}")
        for rank in done:
            current[rank] += 1
            post_batch(rank)
    return rounds
