"""Fault injection at provisioning steps: a test-only facility, off unless configured.

``ZM_AGENT_FAULTS`` holds comma-separated ``point=action`` pairs, read once at start-up:
``kill`` SIGKILLs the agent itself at that point, ``delay:N`` waits N seconds there
(``ZM_AGENT_FAULTS="after-seed=kill"``, ``"after-virtiofsd=delay:90"``). The points are
the boundaries between provisioning steps (``POINTS``); ``after-virtiofsd``,
``after-vmm`` and ``pausing`` are also passed on every VMM (re)start. Unset or empty:
every point is a no-op.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from enum import StrEnum

import structlog

from controller.agent.errors import InvalidSpec

log = structlog.get_logger(__name__)

ENV = "ZM_AGENT_FAULTS"
POINTS = (
    "after-fetch",  # the flist is in the cache
    "after-mount",  # flist (FUSE), root image and overlay mounted
    "after-image",  # image mode: /image.raw copied onto the boot disk
    "after-volumes",  # disks and share directories made
    "after-network",  # taps and IPs
    "after-seed",  # the cidata seed written
    "after-virtiofsd",  # virtiofsd running for every share; the VMM not started yet
    "after-vmm",  # the VMM answers on its API socket
    "pausing",  # a paused spec: the VMM is up and about to be paused
)


class Action(StrEnum):
    KILL = "kill"
    DELAY = "delay"


@dataclass(frozen=True)
class Fault:
    action: Action
    seconds: float = 0.0


def parse(text: str) -> dict[str, Fault]:
    faults: dict[str, Fault] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        point, _, action = item.partition("=")
        if point not in POINTS:
            raise InvalidSpec(f"{ENV}: unknown fault point {point!r} (one of {', '.join(POINTS)})")
        verb, _, arg = action.partition(":")
        if verb == Action.KILL and not arg:
            faults[point] = Fault(Action.KILL)
            continue
        try:
            seconds = float(arg)
        except ValueError:
            seconds = -1.0
        if verb != Action.DELAY or seconds < 0:
            raise InvalidSpec(f"{ENV}: {item!r}: the action must be 'kill' or 'delay:SECONDS'")
        faults[point] = Fault(Action.DELAY, seconds)
    return faults


class Faults:
    def __init__(self, faults: dict[str, Fault]) -> None:
        self.faults = faults
        if faults:
            log.warning("fault injection is on (test only)", faults=str(faults))

    @classmethod
    def from_env(cls) -> Faults:
        return cls(parse(os.environ.get(ENV, "")))

    async def point(self, name: str) -> None:
        fault = self.faults.get(name)
        if fault is None:
            return
        log.warning("injected fault", point=name, action=fault.action.value, seconds=fault.seconds)
        if fault.action is Action.KILL:
            os.kill(os.getpid(), signal.SIGKILL)
        await asyncio.sleep(fault.seconds)
