"""The agent's event fan-out: a subscription sees everything published after it was made,
and one that falls a whole queue behind is cut off (it must resync), never silently thinned."""

from __future__ import annotations

import asyncio

import pytest

from controller.agent.runtime.events import Event, EventBus, EventType, Overflow
from controller.agent.runtime.state import State
from controller.agent.spec import Ref


def _event(uid: str) -> Event:
    return Event(EventType.DEPLOYED, Ref("ns", uid, uid), 1, State.RUNNING)


def test_a_subscription_sees_what_follows_it_filtered_by_uid() -> None:
    async def scenario() -> list[str]:
        bus = EventBus()
        sub = bus.subscribe("b")  # in place before the first publish: nothing is missed
        for uid in ("a", "b", "c", "b"):
            bus.publish(_event(uid))
        seen = []
        async for event in sub.events():
            seen.append(event.ref.uid)
            if len(seen) == 2:
                break
        return seen

    assert asyncio.run(scenario()) == ["b", "b"]


def test_a_subscriber_a_queue_behind_is_cut_off_and_removed() -> None:
    async def scenario() -> EventBus:
        bus = EventBus(queue_size=3)
        slow = bus.subscribe()
        for i in range(4):  # one more than the queue holds
            bus.publish(_event(str(i)))
        assert slow not in bus.subscriptions  # no further events are queued for it
        bus.publish(_event("late"))
        with pytest.raises(Overflow):
            async for _ in slow.events():
                pass
        return bus

    assert asyncio.run(scenario()).subscriptions == set()
