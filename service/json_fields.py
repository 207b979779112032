"""Field types and rules for JSON request bodies, stated in the schema as well as enforced.

What a body's OpenAPI schema says is what the server accepts (the fuzz test holds the two to
each other): numbers are JSON numbers only (strict: no ``true``, no ``"0.5"``), an optional field
is left out rather than sent as ``null``, and "exactly one of" is a ``oneOf`` in the schema.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError

# The error code of values that are each valid but not together (no JSON Schema says that).
CONFLICTING = "conflicting_parameters"


def conflict(message: str) -> PydanticCustomError:
    """A validator's error for fields that conflict; answered as 422 ``conflicting_parameters``."""
    return PydanticCustomError(CONFLICTING, message)

Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False, strict=True)]
PositiveNumber = Annotated[float, Field(gt=0.0, allow_inf_nan=False, strict=True)]


def one_of(*fields: str) -> dict[str, Any]:
    """JSON Schema for "exactly one of these properties" (the model's validator enforces it)."""
    return {"oneOf": [{"required": [f]} for f in fields]}


class NoNulls(BaseModel):
    """A body whose optional fields are left out, never null (its schema allows no null)."""

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict) and (nulls := [k for k, v in data.items() if v is None]):
            raise ValueError(f"leave {', '.join(nulls)} out instead of sending null")
        return data
