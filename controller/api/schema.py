"""Turn pydantic's JSON Schema into a Kubernetes structural OpenAPI v3 schema."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

# Keywords a structural schema may carry; everything else pydantic emits (title, $defs,
# discriminators) is dropped.
_KEPT = {
    "type",
    "description",
    "default",
    "enum",
    "format",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
    "properties",
    "items",
    "additionalProperties",
}


class SchemaError(ValueError):
    """The model cannot be expressed as a structural schema."""


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _convert(raw, raw.get("$defs", {}), model.__name__)


def _convert(node: dict[str, Any], defs: dict[str, Any], where: str) -> dict[str, Any]:
    node = _resolve(node, defs)
    extra = {k: v for k, v in node.items() if k.startswith("x-kubernetes-")}
    if extra.get("x-kubernetes-int-or-string"):
        return {k: v for k, v in node.items() if k in {"description"}} | extra
    if "anyOf" in node:
        # Optional[X] arrives as anyOf [X, null]; the API server expresses "absent" itself.
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise SchemaError(f"{where}: unions other than Optional are not structural")
        merged = _resolve(options[0], defs) | {
            k: v for k, v in node.items() if k not in {"anyOf", "default"}
        }
        if node.get("default") is not None:
            merged["default"] = node["default"]
        return _convert(merged, defs, where)

    out: dict[str, Any] = {k: v for k, v in node.items() if k in _KEPT}
    if out.get("default") is None:
        out.pop("default", None)
    if "properties" in out:
        out["properties"] = {
            name: _convert(sub, defs, f"{where}.{name}") for name, sub in out["properties"].items()
        }
        if not out.get("required"):
            out.pop("required", None)
        # A {} default lets Kubernetes default the fields of an absent object.
    if "items" in out:
        out["items"] = _convert(out["items"], defs, f"{where}[]")
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _convert(out["additionalProperties"], defs, f"{where}{{}}")
    elif out.get("additionalProperties") is False:
        out.pop("additionalProperties")
    if out.get("type") == "array" and out.get("default") == []:
        out.pop("default")
    if out.get("type") == "object" and out.get("default") == {}:
        out.pop("default")
    return out | extra


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        target = dict(defs[name])
        # Field-level keys (description, default, validations) win over the model's own.
        node = target | {k: v for k, v in node.items() if k != "$ref"}
    if "allOf" in node and len(node["allOf"]) == 1:
        inner = _resolve(node["allOf"][0], defs)
        node = inner | {k: v for k, v in node.items() if k != "allOf"}
    return node
