"""Run specs: YAML in, validated `RunSpec` out."""

from mtp_cli.spec.loader import load_spec
from mtp_cli.spec.schema import RunSpec

__all__ = ["RunSpec", "load_spec"]
