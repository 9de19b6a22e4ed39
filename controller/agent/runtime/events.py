"""In-process fan-out of lifecycle events to WatchEvents streams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum

import structlog

from controller.agent.runtime.state import State
from controller.agent.spec import Ref

log = structlog.get_logger(__name__)


class EventType(StrEnum):
    DEPLOYED = "Deployed"
    UPDATED = "Updated"
    EXITED = "Exited"
    RESTARTED = "Restarted"
    PAUSED = "Paused"
    RESUMED = "Resumed"
    FAILED = "Failed"
    DELETED = "Deleted"
    ADOPTED = "Adopted"


@dataclass(frozen=True)
class Event:
    type: EventType
    ref: Ref
    generation: int
    state: State
    reason: str = ""
    message: str = ""
    time: float = 0.0


class EventBus:
    """Every subscriber gets its own bounded queue; a slow one loses its oldest events
    rather than stalling the agent."""

    def __init__(self, queue_size: int = 1024) -> None:
        self._queues: set[asyncio.Queue[Event]] = set()
        self._size = queue_size

    def publish(self, event: Event) -> None:
        if not event.time:
            event = Event(**{**event.__dict__, "time": time.time()})
        log.info(
            "event",
            type=event.type.value,
            zmachine=f"{event.ref.namespace}/{event.ref.name}",
            uid=event.ref.uid,
            state=event.state.value,
            reason=event.reason,
        )
        for q in self._queues:
            if q.full():
                q.get_nowait()
            q.put_nowait(event)

    async def subscribe(self, uid: str = "") -> AsyncIterator[Event]:
        q: asyncio.Queue[Event] = asyncio.Queue(self._size)
        self._queues.add(q)
        try:
            while True:
                event = await q.get()
                if not uid or event.ref.uid == uid:
                    yield event
        finally:
            self._queues.discard(q)
