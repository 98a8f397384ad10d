"""`mtp train SPEC --dry-run-rank R --world-size N`: one rank of a large layout, in this process.

Global rank R of a world of N is built against torch's fake process group (`backend="fake"`:
collectives return at once without communicating), so the rank holds exactly the shards it
would hold in the real job - its pipeline stages, its tensor-parallel slices - and runs
forward, backward and the optimizer step on synthetic batches for `--steps` steps, then writes
its checkpoint shard to a temporary directory and deletes it. The peak of live tensor memory is
measured (`mtp_cli.launch.memory_probe`) and printed next to the memory plan's figure for that
rank. No run directory is read or written, no lock taken.

What the fake group does not do, done here:
* a receive (pipeline) or a gather (tensor / sequence / context parallel) leaves its buffer
  uninitialised; whatever bytes were there could be NaN and stop the step as non-finite, so
  `filled_collectives` fills them: received activations and gradients with N(0, 1) values,
  gathered parts with this rank's own contribution;
* `dcp.save` needs a real group (its planner exchanges plans): the shard is saved with
  `no_dist=True`, which writes what this rank holds;
* `broadcast_object_list` fails off the source rank: nothing here uses it (the trainer's resume
  and checkpoint publishing are not run);
* a broadcast never delivers the source's values, so the checkpoint's check that tied copies
  equal the first stage's embedding (`mtp_cli.mtp.tying`) is switched off for the dry run;
* expert parallel's token counts would arrive uninitialised (and with them the sizes of every
  all-to-all buffer): they are synthesised (`expert_load`): `uniform`, every (source rank, local
  expert) pair gets an equal share of the routed pairs, or `worst`, every token of every source
  rank routed to this rank's experts (at most top-k of them per token), the most an expert rank
  can receive; the tokens themselves are N(0, 1) values of the sizes those counts give.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mtp_cli.config.schema import RunSpec
from mtp_cli.data.batch import Batch
from mtp_cli.errors import Problem, UserError
from mtp_cli.plan.dims import ParallelDims


def synthetic_batches(spec: RunSpec, count: int, seed: int) -> list[Batch]:
    """`count` micro-batches of random tokens with every position in the loss."""
    b, s, vocab = spec.train.micro_batch_size, spec.model.seq_length, spec.model.vocab_size
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        window = torch.randint(0, vocab, (b, s + 1), generator=generator)
        batches.append(Batch(window[:, :-1].contiguous(), window[:, 1:].contiguous(),
                             torch.ones(b, s), torch.arange(s).expand(b, s).contiguous()))
    return batches


# --- what the fake group leaves undone (delimited: only inside a dry run) ------------------------
def _fill_received(ops: list[Any]) -> None:
    for op in ops:
        if op.op is dist.irecv and op.tensor.is_floating_point():
            op.tensor.normal_()


def _wrap(original: Callable, fill: Callable) -> Callable:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        fill(*args, **kwargs)
        return result
    wrapped.__wrapped__ = original  # type: ignore[attr-defined]
    return wrapped


def _fill_gather_into(output: torch.Tensor, input: torch.Tensor, *args: Any, **kw: Any) -> None:
    output.view(-1, input.numel()).copy_(input.reshape(1, -1))


def _fill_gather_list(parts: list[torch.Tensor], tensor: torch.Tensor, *args: Any,
                      **kw: Any) -> None:
    for part in parts:
        part.copy_(tensor)


def _fill_scatter(output: torch.Tensor, input: torch.Tensor, *args: Any, **kw: Any) -> None:
    output.copy_(input.reshape(-1)[:output.numel()].view_as(output))


EXPERT_LOADS = ("uniform", "worst")


def synthetic_expert_counts(send_counts: torch.Tensor, topk: int, load: str) -> torch.Tensor:
    """Token counts this rank's experts receive from each rank of its expert group, `[ep,
    local]`, given what this rank sends (`[ep, local]`, summing to its tokens x top-k)."""
    ep, local = send_counts.shape
    pairs = int(send_counts.sum())
    if load == "worst":  # every source's every token picks min(top-k, local) of our experts
        tokens = pairs // max(topk, 1)
        per_expert = tokens * min(topk, local) // local
        return torch.full_like(send_counts, per_expert)
    share, extra = divmod(pairs, ep * local)  # uniform: equal shares, remainder to the first
    counts = torch.full((ep * local,), share, dtype=send_counts.dtype)
    counts[:extra] += 1
    return counts.view(ep, local).to(send_counts.device)


class _SyntheticAllToAll(torch.autograd.Function):
    """The fake group's all-to-all with buffers of the real sizes and N(0, 1) contents, both ways
    (the fake collective would leave them uninitialised, possibly NaN)."""

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, output_rows: int) -> torch.Tensor:
        ctx.input_shape = input.shape
        return input.new_empty((output_rows, *input.shape[1:])).normal_()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.new_empty(ctx.input_shape).normal_(), None


def _synthetic_all_to_all(input: torch.Tensor, output_split_sizes: list[int],
                          input_split_sizes: list[int], group: Any = None) -> torch.Tensor:
    """`all_to_all_single_autograd`'s signature, `_SyntheticAllToAll`'s buffers."""
    return _SyntheticAllToAll.apply(input, sum(output_split_sizes))


def _counts_filler(topk: int, load: str) -> Callable:
    def fill(output: torch.Tensor, input: torch.Tensor, *args: Any, **kw: Any) -> None:
        if output.is_floating_point():
            output.normal_()
        else:
            output.copy_(synthetic_expert_counts(input, topk, load))
    return fill


@contextlib.contextmanager
def filled_collectives(expert_topk: int = 1, expert_load: str = "uniform") -> Iterator[None]:
    """Give the fake group's receive and gather buffers finite contents while the block runs,
    and expert parallel's all-to-all the synthetic load `expert_load`."""
    from mtp_cli.mtp import tying
    from mtp_cli.parallel import expert_dispatch, tp_mappings

    patches = [
        # tied copies are checked against the source's broadcast weight, which never arrives
        (tying, "_assert_equal", lambda original: lambda *args, **kwargs: None),
        (dist, "batch_isend_irecv", lambda original: _wrap_batch(original)),
        (dist, "all_gather", lambda original: _wrap(original, _fill_gather_list)),
        (dist, "all_gather_into_tensor", lambda original: _wrap(original, _fill_gather_into)),
        (dist, "reduce_scatter_tensor", lambda original: _wrap(original, _fill_scatter)),
        (tp_mappings, "_all_gather_single", lambda original: _wrap(original, _fill_gather_into)),
        (tp_mappings, "_reduce_scatter_single", lambda original: _wrap(original, _fill_scatter)),
        (dist, "all_to_all_single",
         lambda original: _wrap(original, _counts_filler(expert_topk, expert_load))),
        (expert_dispatch, "all_to_all_single_autograd",
         lambda original: _synthetic_all_to_all),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, make in patches:
            setattr(owner, name, make(getattr(owner, name)))
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _wrap_batch(original: Callable) -> Callable:
    def wrapped(ops: list[Any]) -> list[Any]:
        requests = original(ops)
        for request in requests:
            request.wait()
        _fill_received(ops)
        return requests
    return wrapped


# --- the dry run -----------------------------------------------------------------------------------
@dataclass
class DryRunResult:
    rank: int
    world_size: int
    pp_rank: int
    steps: int
    losses: list[float]
    grad_norms: list[float]
    measured_peak: int
    rss_peak: int
    planned_total: float
    device: str
    seconds: float
    measured_build: int = 0  # peak of live tensors while the engine is built
    planned_build: float = 0.0  # the plan's build phase for this rank

    @property
    def ratio(self) -> float:
        return self.planned_total / max(self.measured_peak, 1)

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "pp_rank": self.pp_rank,
                "steps": self.steps, "lm_losses": self.losses, "grad_norms": self.grad_norms,
                "measured_peak": self.measured_peak, "rss_peak": self.rss_peak,
                "planned_total": round(self.planned_total), "plan_over_measured": self.ratio,
                "measured_build": self.measured_build, "planned_build": round(self.planned_build),
                "device": self.device, "seconds": round(self.seconds, 1)}


MAX_WORLD_SIZE = 2**20  # ranks; far past any job, well inside a process group's int32


def check_dry_run(spec: RunSpec, rank: int, world_size: int) -> ParallelDims:
    """The layout and the rank, before anything is built; a `UserError` when they do not fit."""
    if not 1 <= world_size <= MAX_WORLD_SIZE:  # process groups hold ranks in 32 bits
        raise UserError(problems=[Problem(
            f"{world_size} ranks: a dry run rehearses a job of 1 to {MAX_WORLD_SIZE:,} ranks",
            key="--world-size")])
    if not 0 <= rank < world_size:
        raise UserError(problems=[Problem(
            f"rank {rank} is outside the world of {world_size} ranks (0..{world_size - 1})",
            key="--dry-run-rank")])
    dims = ParallelDims.from_spec(spec, world_size)
    dims.check_supported(spec)
    return dims


def dry_run(spec: RunSpec, rank: int, world_size: int, steps: int = 2, *,
            allow_imports: bool = False, expert_load: str = "uniform") -> DryRunResult:
    """Build global rank `rank`'s shards at `world_size`, train `steps` steps, save its
    checkpoint shard to a temporary directory (deleted), and measure its peak memory.
    `expert_load` (`uniform` | `worst`): the synthetic expert-parallel routing."""
    from mtp_cli.facts.stage_tensors import build_memory_plan
    from mtp_cli.launch.distributed import fake_distributed
    from mtp_cli.launch.memory_probe import measure_peak
    from mtp_cli.parallel.mesh import build_mesh
    from mtp_cli.train.engine import build_engine
    from mtp_cli.train.step import StepSettings

    dims = check_dry_run(spec, rank, world_size)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    plan = build_memory_plan(spec, world_size, device=device.type, allow_imports=allow_imports)
    started = time.perf_counter()
    losses, norms = [], []
    with fake_distributed(rank, world_size):
        mesh = build_mesh(dims, device.type)
        count = dims.num_microbatches(spec)
        settings = StepSettings.for_run(spec, dims, mesh, device)
        torch.manual_seed(spec.train.seed)
        topk = spec.model.moe_router_topk or 1
        with filled_collectives(expert_topk=topk, expert_load=expert_load):
            # the allocator's total counts every live byte: the second block's peak is absolute
            with measure_peak(device) as build:
                engine = build_engine(spec, mesh, settings, allow_imports=allow_imports)
            with measure_peak(device) as memory:
                _train_and_save(engine, spec, count, steps, rank, losses, norms)
        pp_rank = mesh.mesh.get_local_rank("pp")
    planned = plan.ranks[pp_rank]
    return DryRunResult(rank, world_size, pp_rank, steps, losses, norms,
                        max(build.peak, memory.peak), max(build.rss_peak, memory.rss_peak),
                        planned.total, device.type, time.perf_counter() - started,
                        build.peak, planned.phases["build"])


def _train_and_save(engine: Any, spec: RunSpec, count: int, steps: int, rank: int,
                    losses: list[float], norms: list[float]) -> None:
    for step in range(steps):
        output = engine.train_step(synthetic_batches(spec, count, 1000 * step + rank))
        losses.append(output.lm_loss)
        norms.append(output.grad_norm)
    _save_and_delete(engine)


def _save_and_delete(engine: Any) -> None:
    """The rank's checkpoint shard, as the trainer saves it, to a temporary directory; deleted."""
    import torch.distributed.checkpoint as dcp

    model_sd, optim_sd = engine.state_dicts()
    directory = tempfile.mkdtemp(prefix="mtp-dry-run-")
    try:
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=directory,
                 no_dist=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
