"""mtp-cli: train language models with DeepSeek-V3-style Multi-Token Prediction.

    from mtp_cli import load_spec, build_model
    spec = load_spec("specs/tiny.yaml", ["mtp.num_layers=2"])
    model = build_model(spec)
"""

# Bound before the imports below: a module they load may read it (`from mtp_cli import
# __version__`) without finding the package half-initialised, so any floor may.
__version__ = "0.1.0"

from mtp_cli.config.loader import add_spec_check, load_spec
from mtp_cli.config.schema import RunSpec
from mtp_cli.errors import SpecError, UserError
from mtp_cli.plan.rules import check_spec


def _check_rules(spec: RunSpec, allow_imports: bool) -> None:
    check_spec(spec)


def _check_module_trees(spec: RunSpec, allow_imports: bool) -> None:
    """The `modules` section's trees name registered modules (imported only here: torch)."""
    from mtp_cli.builders.module_trees import parse_module_trees

    parse_module_trees(spec, allow_imports=allow_imports)


# `load_spec` (config) runs the rules of the floors above it, wired here, in this order: the
# spec's rules (`mtp_cli.plan.rules`), then its module trees (`mtp_cli.builders`).
add_spec_check(_check_rules)
add_spec_check(_check_module_trees)


def build_model(spec, device="cpu", **kwargs):
    """The whole model for one process (every stage); see `mtp_cli.builders.build_model`."""
    from mtp_cli.builders.model_builder import build_model as _build_model

    return _build_model(spec, device, **kwargs)


__all__ = ["RunSpec", "SpecError", "UserError", "__version__", "build_model", "load_spec"]
