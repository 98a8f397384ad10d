"""`build_model`: a validated spec -> the `nn.Module` of one process."""

from __future__ import annotations

import torch

from mtp_cli.builders.freeze import apply_freeze, check_freeze
from mtp_cli.builders.init import initialize_parameters
from mtp_cli.builders.module_trees import build_specs
from mtp_cli.config.schema import RunSpec
from mtp_cli.gpt import GPTModel
from mtp_cli.models.moe.run_state import configure_moe_routers
from mtp_cli.mtp.layer import get_mtp_block_spec
from mtp_cli.mtp.loss import LossSettings
from mtp_cli.plan.run_plan import whole_model_stage
from mtp_cli.plan.stages import Stage


def loss_settings_for(spec: RunSpec, tokens_seen: float = 0) -> LossSettings:
    """The loss settings `spec` asks for (`train.*` and λ after `tokens_seen` tokens).

    `mtp.distill` reads the main head's full logits, so `train.loss.chunked: auto` chunks
    nothing while distilling (the spec refuses `chunked: true` with it)."""
    distill = spec.mtp.distill  # plan.rules: only with depths
    return LossSettings(
        mtp_loss_scaling_factor=spec.mtp.loss_scale_at(tokens_seen),
        calculate_per_token_loss=spec.train.calculate_per_token_loss,
        chunked=False if distill else spec.train.loss.chunked,
        mtp_distill=distill,
        mtp_distill_weight=spec.mtp.distill_weight,
        mtp_distill_temperature=spec.mtp.distill_temperature,
    )


def build_model(spec: RunSpec, device: str | torch.device = "cpu", *,
                stage: Stage | None = None, allow_imports: bool = False,
                initialize: bool = True) -> GPTModel:
    """Build the whole model (every stage) or one pipeline stage, on `device`.

    The model is built from `spec.model` and `spec.mtp`'s architecture; it gets loss settings of
    its own from `spec.train` (a training engine replaces them with the ones it owns, shared by
    all its chunks). On the meta device nothing is allocated (a 600B-parameter spec builds in
    seconds) and no initialisation runs; elsewhere parameters are initialised from `train.seed`
    and their global names, identically whatever the parallel layout. Parameters `train.freeze`
    names are built with `requires_grad = False`.
    """
    whole = stage is None
    stage = stage or whole_model_stage(spec)
    layer_spec, mtp_layer_spec, final_norm_spec = build_specs(spec, allow_imports=allow_imports)
    mtp_block_spec = get_mtp_block_spec(mtp_layer_spec, stage.mtp_layers)
    with torch.device(device):
        model = GPTModel(spec.model, layer_spec, final_norm_spec, mtp_block_spec, stage=stage,
                         mtp=spec.mtp, loss_settings=loss_settings_for(spec))
    if spec.model.num_moe_experts is not None:
        # the stage holding MTP layers holds all D of them (`mtp_cli.plan.placement`)
        configure_moe_routers(model, mtp_repeats=stage.mtp_layers
                              if spec.mtp.use_repeated_layer else 1)
    if initialize and torch.device(device).type != "meta":
        initialize_parameters(model, spec)
    if whole and spec.train.freeze:
        check_freeze(spec, [name for name, _ in model.named_parameters()])
    apply_freeze(model, spec)  # train.freeze: requires_grad False, so no optimizer state
    return model


def state_dict_shapes(spec: RunSpec, *, allow_imports: bool = False) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the spec's model state dict and its shape, from a build on the meta
    device (nothing allocated): the names and shapes a checkpoint stores under `model.`."""
    return model_shapes(build_model(spec, "meta", allow_imports=allow_imports))


def model_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor name of `model`'s state dict and its shape."""
    return {name: tuple(value.shape) for name, value in model.state_dict().items()
            if isinstance(value, torch.Tensor)}
