"""The chunked cross-entropy under tensor and context parallel, on 2 real gloo processes.

Tensor parallel: each rank holds half of the output weight's rows; the function is compared with
the unsharded plain head computed on the same rank, and the tensor-parallel model (with sequence
parallel too) with the single-process plain model through the tensor-parallel suite's own check.
Context parallel: the context-parallel suite's own check, with every head chunked.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mtp_cli.models import chunked_ce
from mtp_cli.models.chunked_ce import ChunkedCEOptions, chunked_linear_cross_entropy
from mtp_cli.models.output import token_loss_and_hits
from mtp_cli.parallel.vocab_parallel import VocabParallelOutputHead
from tests.dist_utils import run_distributed

TOL = {"rtol": 1e-5, "atol": 1e-5}
WORLD = 2
SEQ, BATCH, HIDDEN, VOCAB = 19, 2, 16, 98  # 49 vocab rows per rank


def _inputs(duplicate_rows: bool = False):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=gen).requires_grad_()
    weight = torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5
    if duplicate_rows:  # every logit ties with one on the other shard: argmax must pick rank 0
        weight = torch.cat([weight[: VOCAB // 2]] * 2)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    mask = (torch.rand(BATCH, SEQ, generator=gen) > 0.3).float()
    upstream = torch.randn(BATCH, SEQ, generator=gen)
    return hidden, weight.requires_grad_(), labels, mask, upstream


def _check_head(rank: int, grads_in_forward: bool, masked_mean: bool,
                duplicate_rows: bool) -> None:
    hidden, weight, labels, mask, upstream = _inputs(duplicate_rows)
    if masked_mean:
        upstream = mask / mask.sum()
    rows = slice(rank * VOCAB // WORLD, (rank + 1) * VOCAB // WORLD)
    shard = weight.detach()[rows].clone().requires_grad_()
    head_input = VocabParallelOutputHead(dist.group.WORLD).head_input(hidden)  # grad all-reduce
    loss, pred = chunked_linear_cross_entropy(
        head_input, shard, labels, mask,
        ChunkedCEOptions(tp_group=dist.group.WORLD, chunk_tokens=7,
                         grads_in_forward=grads_in_forward))
    grad_hidden, grad_shard = torch.autograd.grad((loss * upstream).sum(), (hidden, shard))

    expected, expected_hits = token_loss_and_hits(hidden, labels, mask, weight=weight)
    ref_hidden, ref_weight = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    full_logits = torch.einsum("sbh,vh->bsv", hidden.detach(), weight.detach())
    torch.testing.assert_close(loss, expected, **TOL)
    assert torch.equal(pred, full_logits.argmax(-1))
    assert ((pred == labels) & (mask > 0)).sum() == expected_hits
    torch.testing.assert_close(grad_hidden, ref_hidden, **TOL)
    torch.testing.assert_close(grad_shard, ref_weight[rows], **TOL)
    if duplicate_rows:
        assert bool((pred < VOCAB // 2).all())


HEAD_CASES = {  # name: (grads_in_forward, masked_mean upstream, duplicated rows)
    "forward gradients": (True, True, False),
    "recomputed gradients": (False, True, False),
    "arbitrary upstream: every rank falls back": (True, False, False),
    "argmax ties across shards pick the lowest index": (True, True, True),
}


def _head_worker(rank: int, _world_size: int) -> None:
    for name, case in HEAD_CASES.items():
        try:
            _check_head(rank, *case)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from error


@pytest.mark.distributed
def test_tp2_loss_argmax_and_gradients_match_unsharded_head():
    """One spawn for every case (process start-up dominates on 2 cores)."""
    run_distributed(_head_worker, WORLD)


def _tensor_parallel_worker(rank: int, world_size: int) -> None:
    """The tensor-parallel suite's check (TP model vs single process: losses, trackers, every
    gathered gradient, grad norm, logits), with the TP model's heads chunked and the reference's
    plain, for D = 0..2, tied/untied, with/without sequence parallel, both gradient modes."""
    from tests import tp_cases

    chunked_ce.CHUNKED_AUTO_MIN_LOGITS = 0  # `auto` chunks even 24 tokens x 16 vocab
    chunked_ce.CHUNK_LOGITS = 8 * 5  # 5 tokens per chunk at 8 vocab rows per rank
    calls = []
    apply = chunked_ce._LinearCrossEntropy.apply
    chunked_ce._LinearCrossEntropy.apply = lambda *args: calls.append(1) or apply(*args)
    for grads_in_forward in (True, False):
        def plain_reference(spec, group, sequence_parallel, in_forward=grads_in_forward):
            reference, parallel, plan = tp_cases.reference_and_parallel(spec, group,
                                                                        sequence_parallel)
            reference.loss_settings.chunked = False
            parallel.loss_settings.chunked_grads_in_forward = in_forward
            return reference, parallel, plan

        tp_cases.tp_worker(rank, world_size, tp_cases.tp_cases("llama", (0, 1, 2)),
                           build=plain_reference)
    assert len(calls) == 2 * 2 * 2 * (1 + 2 + 3)  # modes x tied x sp x heads of D = 0, 1, 2


@pytest.mark.distributed
def test_tp2_chunked_model_matches_single_process_plain_model():
    run_distributed(_tensor_parallel_worker, 2)


def _context_parallel_worker(rank: int, world_size: int, packed_lengths) -> None:
    """test_context_parallel's check (CP model vs unsharded) with every head chunked."""
    from tests.cp_cases import check_context_parallel

    chunked_ce.CHUNKED_AUTO_MIN_LOGITS = 0  # `auto` chunks even its 16 x 40 logits
    chunked_ce.CHUNK_LOGITS = 40 * 3  # 3 tokens per chunk
    calls = []
    apply = chunked_ce._LinearCrossEntropy.apply
    chunked_ce._LinearCrossEntropy.apply = lambda *args: calls.append(1) or apply(*args)
    check_context_parallel(rank, world_size, packed_lengths)
    assert len(calls) == 2 * 3  # reference and CP model, main head and 2 depths each


@pytest.mark.distributed
@pytest.mark.parametrize("packed_lengths", [None, [4, 8, 4]])
def test_cp2_chunked_heads_equal_unsharded(packed_lengths):
    run_distributed(_context_parallel_worker, 2, packed_lengths)
