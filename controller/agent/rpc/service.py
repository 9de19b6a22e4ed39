"""The gRPC servicer: decodes requests, calls Machines, maps typed errors to status codes.

This is the only place where AgentError becomes a gRPC status; everything below raises
typed exceptions, and anything untyped is reported as INTERNAL with its message.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog

from controller.agent import __version__
from controller.agent.errors import AgentError, InvalidSpec
from controller.agent.guest.provision import Provisioner
from controller.agent.rpc import consoles
from controller.agent.rpc.convert import (
    UnknownVolumeKind,
    event_to_pb,
    interface_from_pb,
    machine_to_pb,
    peer_from_pb,
    ref_from_pb,
    spec_from_pb,
)
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2_grpc as pb_grpc
from controller.agent.runtime.events import EventBus, EventType, Overflow
from controller.agent.runtime.machines import Machines
from controller.agent.spec import validate_planetary_peer, validate_private

log = structlog.get_logger(__name__)
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


def mapped(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turn AgentError into its gRPC status code, with the error's message as details."""

    @functools.wraps(fn)
    async def wrapper(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        try:
            return await fn(self, request, context)
        except AgentError as exc:
            log.info("request refused", method=fn.__name__, code=exc.code.name, error=str(exc))
            await context.abort(exc.code, str(exc))
        except Exception as exc:
            log.exception("request failed", method=fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        raise AssertionError("context.abort returned")  # abort always raises

    return wrapper


async def mapped_stream(
    name: str, items: AsyncIterator[Resp], context: grpc.aio.ServicerContext[Any, Resp]
) -> AsyncIterator[Resp]:
    """``mapped`` for server streams: an AgentError ends the stream with its status code."""
    try:
        async for item in items:
            yield item
    except AgentError as exc:
        log.info("request refused", method=name, code=exc.code.name, error=str(exc))
        await context.abort(exc.code, str(exc))
    except Exception as exc:
        log.exception("request failed", method=name)
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


class AgentService(pb_grpc.AgentServiceServicer):
    def __init__(self, machines: Machines, bus: EventBus, node_name: str) -> None:
        self.machines = machines
        self.bus = bus
        self.node_name = node_name

    @property
    def prov(self) -> Provisioner:
        return self.machines.prov

    @mapped
    async def Deploy(self, request: pb.DeployRequest, context: Any) -> pb.DeployResponse:
        try:
            spec = spec_from_pb(request.spec)
        except UnknownVolumeKind as exc:
            raise InvalidSpec(
                f"zmachine {request.ref.namespace}/{request.ref.name}: {exc}"
            ) from exc
        rec, changed = await self.machines.deploy(
            ref_from_pb(request.ref), request.generation, spec
        )
        return pb.DeployResponse(machine=self._machine(rec.ref.uid), changed=changed)

    def _machine(self, uid: str) -> pb.Machine:
        rec = self.machines.get(uid)
        msg = machine_to_pb(rec)
        msg.console_log = str(self.prov.paths(rec).console_log)
        return msg

    @mapped
    async def Get(self, request: pb.GetRequest, context: Any) -> pb.Machine:
        return self._machine(request.uid)

    @mapped
    async def List(self, request: pb.ListRequest, context: Any) -> pb.ListResponse:
        return pb.ListResponse(machines=[self._machine(uid) for uid in list(self.machines.records)])

    @mapped
    async def Delete(self, request: pb.DeleteRequest, context: Any) -> pb.DeleteResponse:
        return pb.DeleteResponse(existed=await self.machines.delete(request.uid))

    @mapped
    async def Pause(self, request: pb.MachineRequest, context: Any) -> pb.Machine:
        await self.machines.pause(request.uid)
        return self._machine(request.uid)

    @mapped
    async def Resume(self, request: pb.MachineRequest, context: Any) -> pb.Machine:
        await self.machines.resume(request.uid)
        return self._machine(request.uid)

    @mapped
    async def Restart(self, request: pb.MachineRequest, context: Any) -> pb.Machine:
        await self.machines.restart(request.uid)
        return self._machine(request.uid)

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Any
    ) -> AsyncIterator[pb.Event]:
        subscription = self.bus.subscribe(request.uid)
        try:
            yield pb.Event(type=pb.EVENT_TYPE_WATCHING)
            async for event in subscription.events():
                message = event_to_pb(event)
                if event.type is not EventType.DELETED and event.ref.uid in self.machines.records:
                    message.machine.CopyFrom(self._machine(event.ref.uid))
                yield message
        except Overflow as exc:
            log.warning("event watcher fell behind; it must resync", error=str(exc))
            await context.abort(grpc.StatusCode.ABORTED, f"watcher fell behind: {exc}; resync")
        finally:
            subscription.close()

    @mapped
    async def NodeInfo(self, request: pb.NodeInfoRequest, context: Any) -> pb.NodeInfoResponse:
        return await self.node_info()

    async def node_info(self) -> pb.NodeInfoResponse:
        """Also what the node registration publishes on its ZmachineNode."""
        cpus = os.cpu_count() or 1
        memory = self.machines.memory
        used_cpu = sum(r.spec.cpu for r in self.machines.records.values())
        hv = self.prov.hypervisor_info()
        return pb.NodeInfoResponse(
            node_name=self.node_name,
            capacity=pb.Resources(cpu=cpus, memory_bytes=memory),
            allocatable=pb.Resources(
                cpu=max(cpus - used_cpu, 0),
                memory_bytes=max(memory - self.machines.reserved_memory(), 0),
            ),
            hypervisor=hv.name,
            hypervisor_version=hv.version,
            hardware_acceleration=hv.accelerated,
            agent_version=__version__,
            machines=len(self.machines.records),
            public_interface=self.prov.host.public.available(),
            planetary_peer=self.prov.host.planetary.peer_uri(),
            mycelium=self.prov.host.private.mycelium is not None,
            **self.prov.host.overlay_identity(),
        )

    @mapped
    async def ApplyNetwork(
        self, request: pb.ApplyNetworkRequest, context: Any
    ) -> pb.ApplyNetworkResponse:
        peers = [peer_from_pb(request.network_id, p) for p in request.peers]
        nic = None
        if request.HasField("network"):
            nic = interface_from_pb(request.network)
            if nic.network_id != request.network_id:
                raise InvalidSpec(f"network {request.network_id}: its interface names another")
            validate_private(f"network {request.network_id}", nic, None)
        present = await asyncio.to_thread(
            self.prov.host.private.apply, request.network_id, peers, nic
        )
        return pb.ApplyNetworkResponse(present=present)

    @mapped
    async def ApplyPlanetary(
        self, request: pb.ApplyPlanetaryRequest, context: Any
    ) -> pb.ApplyPlanetaryResponse:
        for i, peer in enumerate(request.peers):
            validate_planetary_peer(f"peers[{i}]", peer)
        running = await asyncio.to_thread(self.prov.host.planetary.apply_peers, list(request.peers))
        return pb.ApplyPlanetaryResponse(running=running)

    @mapped
    async def Stats(self, request: pb.MachineRequest, context: Any) -> pb.MachineStats:
        rec = self.machines.get(request.uid)
        s = await self.prov.stats(rec)
        return pb.MachineStats(
            uid=rec.ref.uid,
            vcpu_seconds=s.vcpu_seconds,
            vmm_rss_bytes=s.vmm_rss_bytes,
            net_rx_bytes=s.net_rx_bytes,
            net_tx_bytes=s.net_tx_bytes,
            block_read_bytes=s.block_read_bytes,
            block_write_bytes=s.block_write_bytes,
            restarts=rec.restarts,
            boot_duration_seconds=rec.boot_duration,
        )

    async def AttachConsole(
        self, request_iterator: AsyncIterator[pb.ConsoleInput], context: Any
    ) -> AsyncIterator[pb.ConsoleOutput]:
        session = consoles.attach(self.machines, request_iterator)
        async for msg in mapped_stream("AttachConsole", session, context):
            yield msg

    async def ConsoleLog(
        self, request: pb.ConsoleLogRequest, context: Any
    ) -> AsyncIterator[pb.ConsoleOutput]:
        chunks = consoles.serial_log(self.machines, request)
        async for data in mapped_stream("ConsoleLog", chunks, context):
            yield pb.ConsoleOutput(data=data)
