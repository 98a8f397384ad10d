"""`train.freeze` applied to a built model: matching parameters get `requires_grad = False`.

The optimizer is built from trainable parameters only (`mtp_cli.train.optim`), so frozen ones
get no gradient, no optimizer state and keep their values in every checkpoint. The names are the
rules of `mtp_cli.config.freeze_rules`; `check_freeze` adds what the schema cannot see: every
entry must name at least one parameter of the whole model.
"""

from __future__ import annotations

from torch import nn

from mtp_cli.config.freeze_rules import is_frozen, unmatched_entries
from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import Problem, UserError


def apply_freeze(model: nn.Module, spec: RunSpec) -> list[str]:
    """Freeze `model`'s parameters that `spec.train.freeze` names; returns their names."""
    entries = spec.train.freeze
    if not entries:
        return []
    tied = spec.model.share_embeddings_and_output_weights
    frozen = []
    for name, param in model.named_parameters():
        if is_frozen(name, entries, tied=tied):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def check_freeze(spec: RunSpec, parameter_names: list[str]) -> None:
    """`UserError` (key train.freeze) for entries that name no parameter of the whole model."""
    unmatched = unmatched_entries(spec.train.freeze, parameter_names,
                                  tied=spec.model.share_embeddings_and_output_weights)
    if unmatched:
        raise UserError(problems=[Problem(
            f"{', '.join(repr(e) for e in unmatched)} names no parameter of the model",
            key="train.freeze", hint="see `mtp build --show-spec` or inspect-ckpt --tensors for "
            "the parameter names")])
    if len(parameter_names) and all(is_frozen(n, spec.train.freeze,
                                              tied=spec.model.share_embeddings_and_output_weights)
                                    for n in parameter_names):
        raise UserError(problems=[Problem("every parameter is frozen: nothing would train",
                                          key="train.freeze")])
