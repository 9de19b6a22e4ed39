"""What each node agent runs, pushed by the agent rather than polled.

One WatchEvents stream per node. The agent sends WATCHING once the subscription is in
place; the controller then Lists the node's machines (nothing can be missed between the two)
and from there on applies each event, which carries the machine as it is. A broken stream is
opened again with jittered exponential backoff and resynced by a new List; until then the
node counts as not synced and readers ask the agent directly.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.operator import metrics
from controller.operator.agents import AgentPool
from controller.operator.errors import ControllerError

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

BACKOFF_BASE, BACKOFF_MAX = 0.5, 30.0


@dataclass
class MachineCache:
    """node -> uid -> (sequence number of the update, the machine)."""

    nodes: dict[str, dict[str, tuple[int, pb.Machine]]] = field(default_factory=dict)
    synced: set[str] = field(default_factory=set)
    seq: int = 0

    def get(self, node: str, uid: str) -> pb.Machine | None:
        entry = self.nodes.get(node, {}).get(uid)
        return None if entry is None else entry[1]

    def machines(self, node: str) -> list[pb.Machine]:
        return [m for _, m in self.nodes.get(node, {}).values()]

    def put(self, node: str, machine: pb.Machine, unless_after: int | None = None) -> None:
        """`unless_after`: keep what the stream delivered after that sequence number (a
        Deploy answer may arrive after the event that reports the machine Running)."""
        here = self.nodes.setdefault(node, {})
        held = here.get(machine.ref.uid)
        if unless_after is not None and held is not None and held[0] > unless_after:
            return
        self.seq += 1
        here[machine.ref.uid] = (self.seq, machine)

    def remove(self, node: str, uid: str) -> None:
        self.nodes.get(node, {}).pop(uid, None)

    def replace(self, node: str, machines: list[pb.Machine]) -> set[str]:
        """The node's full list; returns the uids whose machine changed."""
        old = self.nodes.get(node, {})
        self.seq += 1
        new = {m.ref.uid: (self.seq, m) for m in machines}
        self.nodes[node] = new
        self.synced.add(node)
        return {
            uid
            for uid in old.keys() | new.keys()
            if (old.get(uid) or (0, None))[1] != new.get(uid, (0, None))[1]
        }

    def unsync(self, node: str) -> None:
        self.synced.discard(node)

    def drop_node(self, node: str) -> None:
        self.nodes.pop(node, None)
        self.synced.discard(node)


@dataclass
class NodeWatches:
    """One stream task per node; `changed(uid)` is called for every machine that changed."""

    agents: AgentPool
    cache: MachineCache
    changed: Callable[[str], None]
    tasks: dict[str, tuple[str, asyncio.Task[None]]] = field(default_factory=dict)

    def ensure(self, node: str, address: str) -> None:
        """Watch `node` at `address` (a new address replaces the old stream)."""
        current = self.tasks.get(node)
        if current is not None and current[0] == address and not current[1].done():
            return
        if current is not None:
            current[1].cancel()
        task = asyncio.create_task(self._run(node, address), name=f"watch {node}")
        self.tasks[node] = (address, task)

    def stop(self, node: str) -> None:
        current = self.tasks.pop(node, None)
        if current is not None:
            current[1].cancel()
        self.cache.drop_node(node)

    def stop_all(self) -> None:
        for node in list(self.tasks):
            self.stop(node)

    async def _run(self, node: str, address: str) -> None:
        delay = BACKOFF_BASE
        while True:
            try:
                await self._stream(node, address)
                problem = "the stream ended"
            except ControllerError as exc:
                problem = str(exc)
            else:
                delay = BACKOFF_BASE
            self.cache.unsync(node)
            metrics.WATCH_RECONNECTS.inc()
            wait = delay * random.uniform(0.5, 1.5)  # many controllers/nodes: no lockstep
            log.info("agent event stream broken", node=node, error=problem, retry_in=round(wait, 2))
            await asyncio.sleep(wait)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _stream(self, node: str, address: str) -> None:
        agent = self.agents.client(address)
        async for event in agent.watch():
            metrics.WATCH_EVENTS.inc()
            if event.type == pb.EVENT_TYPE_WATCHING:
                for uid in self.cache.replace(node, await agent.list()):
                    self.changed(uid)
                log.info("agent event stream synced", node=node)
                continue
            uid = event.ref.uid
            if event.type == pb.EVENT_TYPE_DELETED or not event.HasField("machine"):
                self.cache.remove(node, uid)
            else:
                self.cache.put(node, event.machine)
            self.changed(uid)
