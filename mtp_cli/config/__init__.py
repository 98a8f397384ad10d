"""Run specs: YAML in, validated `RunSpec` out."""

from mtp_cli.config.loader import load_spec
from mtp_cli.config.schema import RunSpec

__all__ = ["RunSpec", "load_spec"]
