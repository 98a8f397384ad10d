"""The order of one pipeline step on one pipeline rank: computations, and the batched posts
between them, in Megatron-Core's order. Pure arithmetic (no torch), so it can be checked alone.

A rank's step is a list of actions: `Compute` (the forward or backward of one local chunk on one
micro-batch) and `Exchange` (one batched post of sends and receives to the neighbouring
pipeline ranks, which the executor waits on before going on). Both sides post a message in the
same relative order, so the k-th send to a peer meets that peer's k-th receive: nothing is
tagged (NCCL ignores tags and pairs by order).

Pipeline ranks form a ring, as in Megatron-Core: stage `s = chunk x pp + rank` sends its output
to rank `(rank + 1) % pp`, so with virtual stages the last rank feeds rank 0's next chunk.

- Without virtual stages: 1F1B (`forward_backward_pipelining_without_interleaving`): `pp - r - 1`
  warm-up forwards, then one forward / one backward, then the cool-down backwards.
- With virtual stages: interleaved 1F1B (`forward_backward_pipelining_with_interleaving`,
  without p2p overlap): micro-batches run in groups of `g` (`microbatch_group_size_per_vp_stage`)
  through every chunk in turn; `2 (pp - r - 1) + (vpp - 1) g` warm-up forwards, steady 1F1B,
  cool-down backwards. The posts follow its `send_forward_recv_forward`,
  `send_forward_backward_recv_forward_backward` and `send_backward_recv_backward` calls, with
  which chunk a received tensor belongs to worked out as its `recv_tensor_from_previous_stage`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtp_cli.plan.rules import group_size_problem


@dataclass(frozen=True)
class Compute:
    """The forward (or backward) of local chunk `chunk` on micro-batch `micro_batch`."""

    backward: bool
    chunk: int
    micro_batch: int


@dataclass(frozen=True)
class Message:
    """A tensor crossing the boundary after global stage `boundary`: that stage's output for
    `micro_batch` (forward), or the gradient of that output (backward)."""

    boundary: int
    micro_batch: int
    gradient: bool


@dataclass(frozen=True)
class Exchange:
    """One batched post (Megatron's `_communicate`), named after the P2PCommunicator method
    that makes it. `send_next`/`recv_prev` carry activations, `send_prev`/`recv_next` gradients."""

    name: str
    send_next: Message | None = None
    recv_prev: Message | None = None
    send_prev: Message | None = None
    recv_next: Message | None = None

    def slots(self) -> list[tuple[str, Message]]:
        """The posts in the order they are made: sends to a peer activation first, receives
        from a peer activation first. With two pipeline ranks the previous and the next rank
        are the same peer, so this order is what pairs activation with activation and gradient
        with gradient (Megatron's batched order, send_prev before send_next, would cross them)."""
        ordered = (("send_next", self.send_next), ("recv_prev", self.recv_prev),
                   ("send_prev", self.send_prev), ("recv_next", self.recv_next))
        return [(slot, message) for slot, message in ordered if message is not None]

    @property
    def empty(self) -> bool:
        return not self.slots()


Action = Compute | Exchange


def check_group_size(pp: int, num_microbatches: int, group_size: int) -> None:
    """Megatron-Core's rules for `microbatch_group_size_per_vp_stage`; ValueError if broken."""
    problem = group_size_problem(pp, num_microbatches, group_size)
    if problem is not None:
        raise ValueError(problem)


def interleaved_table(group_sizes: list[int], num_chunks: int) -> list[tuple[int, int]]:
    """(chunk, micro-batch) of every forward, in order: each group of consecutive
    micro-batches runs through chunk 0, then chunk 1, ... (Megatron's `get_schedule_table`)."""
    table: list[tuple[int, int]] = []
    start = 0
    for size in group_sizes:
        table += [(chunk, m) for chunk in range(num_chunks) for m in range(start, start + size)]
        start += size
    return table


def megatron_group_sizes(num_microbatches: int, group_size: int) -> list[int]:
    """Groups of `group_size`, the last one holding what is left."""
    return [min(group_size, num_microbatches - start)
            for start in range(0, num_microbatches, group_size)]


def warmup_count(pp: int, rank: int, num_chunks: int, num_microbatches: int,
                 group_size: int) -> int:
    """Warm-up forwards of the interleaved schedule (Megatron's `get_pp_rank_microbatches`)."""
    total = num_microbatches * num_chunks
    return min(total, 2 * (pp - rank - 1) + (num_chunks - 1) * group_size)


def live_output_bound(pp: int, rank: int, num_chunks: int, num_microbatches: int,
                      group_size: int | None = None) -> int:
    """The most (chunk, micro-batch) outputs rank `rank` holds for their backward at once."""
    if num_chunks == 1:
        return min(num_microbatches, pp - rank)
    group = group_size or pp
    return min(num_microbatches * num_chunks,
               2 * (pp - rank - 1) + (num_chunks - 1) * group + 1)


@dataclass
class _Messages:
    """Names the messages of one rank; counts received ones per chunk (they arrive in
    micro-batch order, as Megatron appends them to `input_tensors[chunk]`)."""

    pp: int
    rank: int
    num_chunks: int

    def __post_init__(self) -> None:
        self._activations = [0] * self.num_chunks
        self._gradients = [0] * self.num_chunks

    def stage(self, chunk: int) -> int:
        return chunk * self.pp + self.rank

    def output(self, chunk: int, micro_batch: int) -> Message | None:
        """What a forward sends on (None from the last stage)."""
        stage = self.stage(chunk)
        return None if stage == self.pp * self.num_chunks - 1 else \
            Message(stage, micro_batch, gradient=False)

    def input_gradient(self, chunk: int, micro_batch: int) -> Message | None:
        """What a backward sends back (None from the first stage)."""
        stage = self.stage(chunk)
        return None if stage == 0 else Message(stage - 1, micro_batch, gradient=True)

    def next_input(self, chunk: int) -> Message:
        micro_batch = self._activations[chunk]
        self._activations[chunk] += 1
        return Message(self.stage(chunk) - 1, micro_batch, gradient=False)

    def next_output_gradient(self, chunk: int) -> Message:
        micro_batch = self._gradients[chunk]
        self._gradients[chunk] += 1
        return Message(self.stage(chunk), micro_batch, gradient=True)


def one_f_one_b(pp: int, rank: int, num_microbatches: int, *,
                forward_only: bool = False) -> list[Action]:
    """1F1B without virtual stages, with Megatron-Core's posts (recv_forward, send_forward,
    send_forward_recv_backward, send_backward_recv_forward, recv_backward, send_backward)."""
    names = _Messages(pp, rank, 1)
    first, last = rank == 0, rank == pp - 1
    warmup = min(pp - rank - 1, num_microbatches)
    remaining = num_microbatches - warmup
    actions: list[Action] = []

    def post(exchange: Exchange) -> None:
        if not exchange.empty:
            actions.append(exchange)

    def recv_forward() -> None:
        if not first:
            post(Exchange("recv_forward", recv_prev=names.next_input(0)))

    for m in range(warmup):
        recv_forward()
        actions.append(Compute(False, 0, m))
        post(Exchange("send_forward", send_next=names.output(0, m)))
    if remaining:
        recv_forward()
    for i in range(remaining):
        m, last_iteration = warmup + i, i == remaining - 1
        actions.append(Compute(False, 0, m))
        if forward_only:
            post(Exchange("send_forward", send_next=names.output(0, m)))
            if not last_iteration:
                recv_forward()
            continue
        if not last:
            post(Exchange("send_forward_recv_backward", send_next=names.output(0, m),
                          recv_next=names.next_output_gradient(0)))
        actions.append(Compute(True, 0, i))
        if first:
            continue
        if last_iteration:
            post(Exchange("send_backward", send_prev=names.input_gradient(0, i)))
        else:
            post(Exchange("send_backward_recv_forward", send_prev=names.input_gradient(0, i),
                          recv_prev=names.next_input(0)))
    if not forward_only:
        for m in range(remaining, num_microbatches):
            if not last:
                post(Exchange("recv_backward", recv_next=names.next_output_gradient(0)))
            actions.append(Compute(True, 0, m))
            post(Exchange("send_backward", send_prev=names.input_gradient(0, m)))
    return actions


@dataclass
class _Interleaved:
    """One rank's interleaved 1F1B over a forward table; see `interleaved_1f1b`."""

    pp: int
    rank: int
    num_chunks: int
    table: list[tuple[int, int]]
    warmup: int
    forward_only: bool

    def __post_init__(self) -> None:
        self.total = len(self.table)
        self.names = _Messages(self.pp, self.rank, self.num_chunks)
        self.actions: list[Action] = []

    def chunk(self, k: int, forward: bool) -> int:
        chunk = self.table[k % self.total][0]
        return chunk if forward else self.num_chunks - 1 - chunk

    def work(self, k: int, forward: bool) -> Compute:
        return Compute(not forward, self.chunk(k, forward), self.table[k][1])

    def receive_after(self, k: int, forward: bool) -> int | None:
        """The chunk whose input (forward) or output gradient (backward) arrives in the post
        after iteration k, or None (Megatron's `recv_tensor_from_previous_stage`). The leading
        rank (first in forward, last in backward) gets what the ending rank made pp - 1
        iterations earlier, and nothing from the ending rank's last chunk."""
        leading = self.rank == (0 if forward else self.pp - 1)
        if not leading:
            return self.chunk(k + 1, forward)
        if k < self.pp - 1:
            return None
        source = self.chunk(k - (self.pp - 1), forward)
        if source == (self.num_chunks - 1 if forward else 0):
            return None
        return source + 1 if forward else source - 1

    def recv_input(self, chunk: int | None) -> Message | None:
        return None if chunk is None else self.names.next_input(chunk)

    def recv_gradient(self, chunk: int | None) -> Message | None:
        return None if chunk is None else self.names.next_output_gradient(chunk)

    def post(self, exchange: Exchange) -> None:
        if not exchange.empty:
            self.actions.append(exchange)

    def sent_output(self, work: Compute) -> Message | None:
        return self.names.output(work.chunk, work.micro_batch)

    def build(self) -> list[Action]:
        if self.rank != 0:  # chunk 0's first input; stage 0 reads the data instead
            self.post(Exchange("recv_forward", recv_prev=self.names.next_input(0)))
        self._warmup()
        self._steady()
        if not self.forward_only:
            self._cooldown()
        return self.actions

    def _warmup(self) -> None:
        all_warmup = self.warmup == self.total
        for k in range(self.warmup):
            work = self.work(k, forward=True)
            self.actions.append(work)
            chunk = self.receive_after(k, forward=True) if k < self.total - 1 else None
            if k == self.warmup - 1 and not self.forward_only and not all_warmup:
                gradient = None if self.rank == self.pp - 1 else self.num_chunks - 1
                self.post(Exchange("send_forward_backward_recv_forward_backward",
                                   send_next=self.sent_output(work),
                                   recv_prev=self.recv_input(chunk),
                                   recv_next=self.recv_gradient(gradient)))
            else:
                self.post(Exchange("send_forward_recv_forward", send_next=self.sent_output(work),
                                   recv_prev=self.recv_input(chunk)))

    def _steady(self) -> None:
        remaining = self.total - self.warmup
        for i in range(remaining):
            forward, backward = self.work(i + self.warmup, True), self.work(i, False)
            self.actions += [forward, backward]
            ahead = self.receive_after(i + self.warmup, forward=True)
            behind = self.receive_after(i, forward=False)
            self.post(Exchange(
                "send_forward_backward_recv_forward_backward",
                send_next=self.sent_output(forward),
                recv_prev=None if i == remaining - 1 else self.recv_input(ahead),
                send_prev=self.names.input_gradient(backward.chunk, backward.micro_batch),
                recv_next=self.recv_gradient(behind)))

    def _cooldown(self) -> None:
        if self.warmup == self.total and self.rank != self.pp - 1:
            self.post(Exchange("recv_backward",
                               recv_next=self.names.next_output_gradient(self.num_chunks - 1)))
        for k in range(self.total - self.warmup, self.total):
            work = self.work(k, forward=False)
            self.actions.append(work)
            chunk = self.receive_after(k, forward=False) if k < self.total - 1 else None
            self.post(Exchange("send_backward_recv_backward",
                               send_prev=self.names.input_gradient(work.chunk, work.micro_batch),
                               recv_next=self.recv_gradient(chunk)))


def interleaved_1f1b(pp: int, rank: int, num_chunks: int, num_microbatches: int,
                     group_size: int | None = None, *, forward_only: bool = False
                     ) -> list[Action]:
    """Interleaved 1F1B for `num_chunks` virtual stages per rank (Megatron-Core's order).

    Training checks Megatron's group-size rules. Forward only (validation, which keeps no
    activations) uses the same groups, except that a last group smaller than pp is merged
    into the one before it, so any count of at least pp micro-batches runs.
    """
    group = group_size or pp
    if forward_only:
        if num_microbatches < pp:
            raise ValueError(f"interleaved forward needs at least pipeline ({pp}) "
                             f"micro-batches, got {num_microbatches}")
        sizes = megatron_group_sizes(num_microbatches, min(group, num_microbatches))
        if len(sizes) > 1 and sizes[-1] < pp:
            sizes[-2:] = [sizes[-2] + sizes[-1]]
        warmup = num_microbatches * num_chunks
    else:
        check_group_size(pp, num_microbatches, group)
        sizes = megatron_group_sizes(num_microbatches, group)
        warmup = warmup_count(pp, rank, num_chunks, num_microbatches, group)
    table = interleaved_table(sizes, num_chunks)
    return _Interleaved(pp, rank, num_chunks, table, warmup, forward_only).build()


def step_order(pp: int, rank: int, num_chunks: int, num_microbatches: int,
               group_size: int | None = None, *, forward_only: bool = False) -> list[Action]:
    """This rank's actions for one step: 1F1B with one chunk, interleaved 1F1B with more."""
    if num_chunks == 1:
        return one_f_one_b(pp, rank, num_microbatches, forward_only=forward_only)
    return interleaved_1f1b(pp, rank, num_chunks, num_microbatches, group_size,
                            forward_only=forward_only)
