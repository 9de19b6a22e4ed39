"""In-process fan-out of lifecycle events to WatchEvents streams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
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
    BOOTED = "Booted"


@dataclass(frozen=True)
class Event:
    type: EventType
    ref: Ref
    generation: int
    state: State
    reason: str = ""
    message: str = ""
    time: float = 0.0


class Overflow(Exception):
    """The subscriber fell more than a queue behind: it lost events and must resync."""


@dataclass(eq=False)
class Subscription:
    """Registered from creation on: nothing published after it is missed."""

    bus: EventBus
    uid: str
    queue: asyncio.Queue[Event | None] = field(init=False)

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(self.bus.size)
        self.bus.subscriptions.add(self)

    def close(self) -> None:
        self.bus.subscriptions.discard(self)

    async def events(self) -> AsyncIterator[Event]:
        """Raises Overflow when events were dropped (None marks the loss)."""
        try:
            while True:
                event = await self.queue.get()
                if event is None:
                    raise Overflow(f"more than {self.bus.size} events behind")
                if not self.uid or event.ref.uid == self.uid:
                    yield event
        finally:
            self.close()


class EventBus:
    """Every subscriber gets its own bounded queue; a slow one is cut off (it resyncs)
    rather than stalling the agent or silently missing a state change."""

    def __init__(self, queue_size: int = 4096) -> None:
        self.subscriptions: set[Subscription] = set()
        self.size = queue_size

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
        for sub in list(self.subscriptions):
            if sub.queue.full():
                # Drop everything queued and leave the loss marker alone in the queue.
                while not sub.queue.empty():
                    sub.queue.get_nowait()
                sub.queue.put_nowait(None)
                sub.close()
                continue
            sub.queue.put_nowait(event)

    def subscribe(self, uid: str = "") -> Subscription:
        return Subscription(self, uid)
