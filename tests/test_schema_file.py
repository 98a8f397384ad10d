"""The JSON Schema editors read: `schema.json` ships at the repository root, equal to what
`mtp schema` prints, and every spec key carries a description."""

from __future__ import annotations

import json
import re
from typing import Any

from mtp_cli.config.schema import RunSpec
from tests.cli_helpers import REPO_ROOT

SCHEMA_FILE = REPO_ROOT / "schema.json"
MODELINE = re.compile(r"yaml-language-server:\s*\$schema=(\S+)")


def keys_without_description(schema: dict[str, Any]) -> list[str]:
    """`Section.key` of every property (of the root and of every definition) lacking one."""
    objects = {"RunSpec": schema, **schema.get("$defs", {})}
    return [f"{name}.{key}" for name, obj in objects.items()
            for key, prop in obj.get("properties", {}).items() if not prop.get("description")]


def test_shipped_schema_equals_mtp_schema():
    """`mtp schema` prints `RunSpec.model_json_schema()` (tests/test_build_cli.py runs it)."""
    assert json.loads(SCHEMA_FILE.read_text()) == RunSpec.model_json_schema(), (
        "schema.json is stale: regenerate it with `mtp schema > schema.json`")


def test_schema_command_prints_the_model_schema():
    from typer.testing import CliRunner

    from mtp_cli.cli import app

    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0 and json.loads(result.stdout) == RunSpec.model_json_schema()


def test_every_spec_key_has_a_description():
    schema = RunSpec.model_json_schema()
    assert keys_without_description(schema) == []
    # the walk sees every section and nested model (it would miss nothing that has keys)
    assert {"ModelConfig", "TrainConfig", "LossConfig", "LossWeightStep"} <= set(schema["$defs"])


def test_the_walk_finds_a_missing_description():
    schema = {"properties": {"a": {"description": "x"}, "b": {"type": "integer"}},
              "$defs": {"S": {"properties": {"c": {"$ref": "#/$defs/T"}}}}}
    assert keys_without_description(schema) == ["RunSpec.b", "S.c"]


def test_spec_files_point_at_a_schema_that_exists():
    for spec in [*REPO_ROOT.glob("specs/*.yaml"), *REPO_ROOT.glob("examples/*.yaml")]:
        for target in MODELINE.findall(spec.read_text()):
            assert (spec.parent / target).resolve() == SCHEMA_FILE, (spec, target)
