"""Kubernetes-style conditions on the Zmachine status."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

SCHEDULED = "Scheduled"
PROVISIONED = "Provisioned"
READY = "Ready"
PAUSED = "Paused"
NODE_READY = "NodeReady"


def format_time(when: datetime.datetime) -> str:
    """metav1.Time: RFC 3339 in UTC, whole seconds."""
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def now() -> str:
    return format_time(datetime.datetime.now(datetime.UTC))


def set_condition(
    existing: Sequence[Mapping[str, Any]],
    type_: str,
    status: bool | None,
    reason: str,
    message: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Return the condition list with `type_` updated.

    lastTransitionTime moves only when the status value changes, as the API conventions ask.
    """
    value = "Unknown" if status is None else ("True" if status else "False")
    result: list[dict[str, Any]] = []
    found = False
    for cond in existing:
        if cond.get("type") != type_:
            result.append(dict(cond))
            continue
        found = True
        changed = cond.get("status") != value
        result.append(
            _make(
                type_,
                value,
                reason,
                message,
                generation,
                now() if changed else str(cond.get("lastTransitionTime") or now()),
            )
        )
    if not found:
        result.append(_make(type_, value, reason, message, generation, now()))
    return result


def _make(
    type_: str, value: str, reason: str, message: str, generation: int | None, when: str
) -> dict[str, Any]:
    cond: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": when,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def get_condition(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)
