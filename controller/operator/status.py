"""Writing a Zmachine's status: only what changed, events on phase transitions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import kopf

from controller.api import conditions
from controller.api.zmachine import Phase

_WARNING_PHASES = (Phase.FAILED, Phase.UNKNOWN)
# (type, reason, message) -> posts an Event about the object.
Poster = Callable[[str, str, str], None]


class StatusWriter:
    """Accumulates status changes into kopf's patch, skipping values that are already set."""

    def __init__(
        self,
        body: kopf.Body,
        status: Mapping[str, Any],
        patch: kopf.Patch,
        generation: int | None,
        post: Poster | None = None,
    ) -> None:
        """`post`: where Events go; kopf's per-object poster unless given."""
        self.body = body
        self._post = post or self._kopf_event
        self.current: dict[str, Any] = dict(status)
        self.patch = patch
        self.generation = generation
        self.conditions: list[dict[str, Any]] = [dict(c) for c in status.get("conditions") or []]
        self._initial_phase = status.get("phase")
        self._phase_event: tuple[str, str, str] | None = None

    @property
    def phase(self) -> str | None:
        value = self.patch.status.get("phase", self.current.get("phase"))
        return None if value is None else str(value)

    def set(self, key: str, value: Any) -> None:
        if self.current.get(key) != value:
            self.patch.status[key] = value

    def condition(
        self,
        type_: str,
        ok: bool | None,
        reason: str,
        message: str,
        generation: int | None = None,
    ) -> None:
        """`generation`: what the condition describes, when not the spec's generation
        (the node may still run an older one)."""
        self.conditions = conditions.set_condition(
            self.conditions, type_, ok, reason, message, generation or self.generation
        )
        if self.conditions != list(self.current.get("conditions") or []):
            self.patch.status["conditions"] = self.conditions

    def phase_to(self, phase: Phase, reason: str, message: str) -> None:
        """The Event for a transition waits for `flush`: one pass that goes through
        several phases (Scheduled, then Provisioning) posts one Event, for where it ends."""
        self.set("phase", phase.value)
        self.set("message", message)
        kind = "Warning" if phase in _WARNING_PHASES else "Normal"
        self._phase_event = (kind, reason, f"{phase.value}: {message}")

    def written(self, fields: Mapping[str, Any]) -> None:
        """`fields` of the pending patch were written by other means (with the placement):
        they count as current and leave the patch."""
        for key, value in fields.items():
            self.current[key] = value
            if self.patch.status.get(key) == value:
                del self.patch.status[key]

    def flush(self) -> None:
        """Post the phase transition's Event, if the phase changed."""
        if self._phase_event is not None and self.phase != self._initial_phase:
            self._post(*self._phase_event)
        self._phase_event = None

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        self._post("Warning" if warning else "Normal", reason, message)

    def _kopf_event(self, type_: str, reason: str, message: str) -> None:
        kopf.event(self.body, type=type_, reason=reason, message=message)
