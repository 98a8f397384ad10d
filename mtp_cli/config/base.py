"""What every spec section shares: strict Pydantic models, integer bounds, and cross-field rule
errors that carry the offending key (so the loader can point at its line in the YAML file)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

PositiveInt = Annotated[int, Field(strict=True, ge=1)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]


def rule_error(field: str, message: str) -> PydanticCustomError:
    """A cross-field rule violation attributed to `field` (a key of the model raising it)."""
    return PydanticCustomError("spec_rule", "{message}", {"field": field, "message": message})


class StrictModel(BaseModel):
    """Base for every spec section: unknown keys are errors, numbers must be finite."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, validate_default=True, strict=True
    )
