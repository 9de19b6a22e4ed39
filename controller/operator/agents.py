"""Calls to node agents: one client per address, with latency metrics and typed errors."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from controller.agent.rpc.client import AgentClient
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.rpc.tls import ClientTLS
from controller.operator import metrics
from controller.operator.errors import (
    AgentRejected,
    AgentUnavailable,
    MachineNotFound,
    NodeOutOfCapacity,
)

T = TypeVar("T")

_REJECTED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
}


@dataclass
class AgentPool:
    """Clients by agent address; `tls_dir` holds ca.crt, client.crt, client.key."""

    tls_dir: Path | None
    # The name agent certificates carry; without it each is checked against its address.
    server_name: str | None = None
    timeout: float = 60.0
    _clients: dict[str, AgentClient] = field(default_factory=dict)

    def client(self, address: str) -> Agent:
        if address not in self._clients:
            tls = ClientTLS.from_dir(self.tls_dir, self.server_name) if self.tls_dir else None
            self._clients[address] = AgentClient(address, tls, timeout=self.timeout)
        return Agent(address, self._clients[address])

    async def forget(self, address: str) -> None:
        """Close the channel of a node that went away, so clients do not pile up."""
        gone = self._clients.pop(address, None)
        if gone is not None:
            await gone.close()

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


@dataclass
class Agent:
    address: str
    raw: AgentClient

    def _error(self, method: str, exc: grpc.aio.AioRpcError) -> Exception:
        code = exc.code()
        metrics.AGENT_CALL_ERRORS.labels(method=method, code=code.name).inc()
        detail = f"{exc.details() or code.name} ({code.name})"
        if code == grpc.StatusCode.NOT_FOUND:
            return MachineNotFound(f"agent at {self.address}: {detail}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return NodeOutOfCapacity(f"agent at {self.address} refused {method}: {detail}")
        if code in _REJECTED:
            return AgentRejected(f"agent at {self.address} refused {method}: {detail}")
        return AgentUnavailable(f"agent at {self.address} did not answer {method}: {detail}")

    async def _call(self, method: str, call: Callable[[], Awaitable[T]]) -> T:
        started = time.monotonic()
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            raise self._error(method, exc) from exc
        finally:
            metrics.AGENT_CALL_SECONDS.labels(method=method).observe(time.monotonic() - started)

    async def watch(self) -> AsyncIterator[pb.Event]:
        """The agent's event stream (WATCHING first), until it breaks: then a typed error."""
        try:
            async for event in self.raw.watch_events():
                yield event
        except grpc.aio.AioRpcError as exc:
            raise self._error("WatchEvents", exc) from exc

    async def deploy(
        self, ref: pb.ZmachineRef, generation: int, spec: pb.ZmachineSpec
    ) -> pb.DeployResponse:
        return await self._call("Deploy", lambda: self.raw.deploy(ref, generation, spec))

    async def get(self, uid: str) -> pb.Machine | None:
        try:
            return await self._call("Get", lambda: self.raw.get(uid))
        except MachineNotFound:
            return None

    async def delete(self, uid: str) -> bool:
        return await self._call("Delete", lambda: self.raw.delete(uid))

    async def list(self) -> list[pb.Machine]:
        return await self._call("List", self.raw.list)

    async def stats(self, uid: str) -> pb.MachineStats:
        return await self._call("Stats", lambda: self.raw.stats(uid))

    async def apply_network(
        self, network_id: str, peers: Sequence[pb.WireguardPeer], network: pb.NetworkInterface
    ) -> pb.ApplyNetworkResponse:
        return await self._call(
            "ApplyNetwork", lambda: self.raw.apply_network(network_id, peers, network)
        )

    async def apply_planetary(self, peers: Sequence[str]) -> pb.ApplyPlanetaryResponse:
        return await self._call("ApplyPlanetary", lambda: self.raw.apply_planetary(peers))
