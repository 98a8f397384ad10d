"""Tensor parallel composes with data parallel: DP2 x TP2 (4 gloo processes).

The TP-converted model (plain Parameters) is wrapped by FSDP2 (`fully_shard` over the data mesh)
or DDP over the data group; three clipped AdamW steps on a global batch of two micro-batches
(one per data rank) equal the single-process run on both micro-batches.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from mtp_cli import build_model
from mtp_cli.mtp import MTPLossAutoScaler
from mtp_cli.parallel.tensor_parallel import parallelize_tensor
from mtp_cli.parallel.tp_grads import sync_sequence_parallel_grads
from mtp_cli.train.step import StepLayout, clip_gradients
from tests.dist_utils import run_distributed
from tests.tp_cases import assert_close, make_batch, make_spec

pytestmark = pytest.mark.distributed


def _masked_mean_backward(model, batch, scale: float) -> None:
    """Backward of `scale` x (masked-mean main loss + the MTP term), as a trainer does it."""
    ids, positions, labels, mask = batch
    MTPLossAutoScaler.set_loss_scale(scale)
    per_token = model(ids, positions, labels=labels, loss_mask=mask)
    (scale * (per_token * mask).sum() / mask.sum()).backward()


def _full_state(model, plan, wrap: str) -> dict[str, torch.Tensor]:
    inner = model.module if wrap == "ddp" else model
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
             for k, v in inner.state_dict().items()}  # FSDP2: DTensors over the data mesh
    return plan.gather_state_dict(state)


def _run(wrap: str, sequence_parallel: bool) -> None:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_mesh, tp_group = mesh["dp"], mesh["tp"].get_group()
    spec = make_spec("llama", 2, True, add_bias_linear=False, add_qkv_bias=False,
                     init_method_std=0.02)
    reference = build_model(spec)
    model = copy.deepcopy(reference)
    plan = parallelize_tensor(model, tp_group, sequence_parallel=sequence_parallel)
    if wrap == "fsdp":
        for layer in [*model.decoder.layers.values(), *model.mtp.layers.values()]:
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    else:
        model = DistributedDataParallel(model, process_group=dp_mesh.get_group())
    ref_opt, opt = (torch.optim.AdamW(m.parameters(), lr=1e-2, eps=1e-6)
                    for m in (reference, model))
    # FSDP2 leaves each data rank rows of every gradient: the norm sums them over the data group
    layout = StepLayout(dp_cp_group=dp_mesh.get_group(), grad_sync=wrap)
    for step in range(3):
        batches = [make_batch(seed=200 + 2 * step + i) for i in range(2)]
        ref_opt.zero_grad()
        opt.zero_grad()
        for batch in batches:  # two micro-batches on one process: each weighs 1/2
            _masked_mean_backward(reference, batch, 0.5)
        # one per data rank; data parallel averages the gradients over the two
        _masked_mean_backward(model, batches[dp_mesh.get_local_rank()], 1.0)
        sync_sequence_parallel_grads(model)
        expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        plain = model.module if wrap == "ddp" else model  # the step clips the plain model
        norm = torch.tensor(clip_gradients([plain], 0.5, layout, torch.device("cpu")))
        assert_close(norm, expected_norm, f"{wrap} sp={sequence_parallel} step {step} norm")
        ref_opt.step()
        opt.step()
    final, expected = _full_state(model, plan, wrap), reference.state_dict()
    for name in expected:
        assert_close(final[name], expected[name], f"{wrap} sp={sequence_parallel}: {name}")


def _worker(rank: int, world_size: int) -> None:
    _run("fsdp", sequence_parallel=True)
    _run("ddp", sequence_parallel=False)


def test_dp2_x_tp2_with_fsdp2_and_ddp_matches_single_process():
    run_distributed(_worker, 4)
