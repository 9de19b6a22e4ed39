"""Shared pydantic configuration and schema helpers for the custom resources."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel


class KubeModel(BaseModel):
    """Base for every resource model: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        frozen=False,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as the Kubernetes API stores it (camelCase, unset fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def rule(expression: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """A CEL `x-kubernetes-validations` entry."""
    entry = {"rule": expression, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    return entry


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


def list_map(key: str) -> dict[str, Any]:
    """A list whose items are unique by `key`, merged by key on server-side apply."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]}


# A Kubernetes quantity ("2Gi", "500M" or a plain integer of bytes).
Quantity = Annotated[
    int | str,
    WithJsonSchema({"x-kubernetes-int-or-string": True}),
    Field(union_mode="left_to_right"),
]


def quantity_bytes_cel(path: str) -> str:
    """CEL that evaluates an int-or-string quantity at `path` to an integer of bytes."""
    return f"(type({path}) == int ? int({path}) : quantity(string({path})).asInteger())"


def quantity_valid_cel(path: str) -> str:
    return f"(type({path}) == int || isQuantity(string({path})))"
