"""The MoE metrics of a step (`MoEStepMetrics`) against Megatron-Core's formula written out by
hand from the routers' inputs: `sum over layers of (sum over micro-batches of loss / coeff)
/ micro-batches / (MoE decoder layers + MTP layers)`, and the load imbalance from the counts the
routers' outputs show; each run's routers keep their own records."""

from __future__ import annotations

import torch

from mtp_cli import build_model, load_spec
from mtp_cli.models.moe.run_state import moe_routers
from mtp_cli.plan.run_plan import RunPlan
from mtp_cli.train.moe_metrics import MoEStepMetrics
from mtp_cli.train.optim import build_optimizer
from mtp_cli.train.progress import summary_text
from mtp_cli.train.step import StepSettings, train_step
from tests.step_helpers import MOE_STEP_SPEC, moe_batches

E, TOPK = 4, 2


def _hand_aux_and_z(logits: torch.Tensor) -> tuple[float, float]:
    """Switch balancing loss / coeff (sigmoid scores normalised over the experts, plain top-k)
    and z-loss / coeff of one micro-batch's router logits `[T, E]`."""
    scores = torch.sigmoid(logits)
    scores = scores / scores.sum(-1, keepdim=True)
    chosen = torch.zeros_like(scores).scatter(1, scores.topk(TOPK, dim=1).indices, 1.0)
    tokens = logits.shape[0]
    aux = (scores.sum(0) * chosen.sum(0)).sum() * E / (TOPK * tokens * tokens)
    z = torch.logsumexp(logits, dim=-1).square().mean()
    return float(aux), float(z)


def test_step_metrics_follow_megatron_averaging():
    spec = load_spec({**MOE_STEP_SPEC, "model": {**MOE_STEP_SPEC["model"], "moe_z_loss_coeff": 0.001}})
    model = build_model(spec)
    optimizer = build_optimizer(model, spec.train)
    settings = StepSettings(num_microbatches=3, per_token_loss=False, grad_clip=0.0, bf16=False,
                            device=torch.device("cpu"), dp_cp_size=1, dp_cp_group=None)
    seen = []  # (router, logits, routing map) per forward

    def hook(router, inputs, output):
        hidden = inputs[0].reshape(-1, inputs[0].shape[-1]).detach().float()
        seen.append((router, hidden @ router.weight.detach().float().t(), output[1]))

    routers = moe_routers(model)
    for router in routers:
        router.register_forward_hook(hook)
    train_step(model, optimizer, moe_batches(3), settings)
    metrics = MoEStepMetrics(RunPlan.of(spec))
    values = metrics.collect([model], num_microbatches=3)

    aux = z = 0.0
    imbalance = 0.0
    for router in routers:
        counts = torch.zeros(E)
        for owner, logits, routing_map in seen:
            if owner is router:
                a, b = _hand_aux_and_z(logits)
                aux, z = aux + a, z + b
                counts += routing_map.sum(0).float()
        imbalance = max(imbalance, float(counts.max() / counts.mean()))
    layers = 2  # one MoE decoder layer + one MTP layer
    assert set(values) == {"load_balancing_loss", "z_loss", "load_imbalance"}
    assert abs(values["load_balancing_loss"] - aux / 3 / layers) < 1e-6
    assert abs(values["z_loss"] - z / 3 / layers) < 1e-5
    assert abs(values["load_imbalance"] - imbalance) < 1e-6
    assert all(router.metrics.losses == {} for router in routers)  # cleared for the next step
    line = summary_text({"lm_loss": 1.0, "tokens_per_s": 10.0, **values}, depths=0)
    assert "load_balancing_loss" in line and "load_imbalance" in line


def test_dense_models_log_no_moe_metrics():
    spec = load_spec({"model": {k: v for k, v in MOE_STEP_SPEC["model"].items()
                                if not k.startswith(("moe_", "num_moe"))}})
    assert MoEStepMetrics(RunPlan.of(spec)).collect([build_model(spec)], num_microbatches=1) == {}
