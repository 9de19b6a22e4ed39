"""Typed async client of the node agent (what the controller uses).

gRPC errors surface as ``grpc.aio.AioRpcError`` with the agent's status code and message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from types import TracebackType

import grpc

from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2_grpc as pb_grpc
from controller.agent.rpc.tls import ClientTLS, channel_credentials


class AgentClient:
    """``AgentClient("host:port", ClientTLS(...))``; ``tls=None`` means plaintext
    (only accepted by an agent started with ``--insecure-dev``)."""

    def __init__(
        self,
        address: str,
        tls: ClientTLS | None,
        timeout: float = 120.0,
        options: Sequence[tuple[str, int | str]] = (),
    ) -> None:
        """``options``: extra gRPC channel arguments (e.g. reconnect backoff)."""
        self.address = address
        self.timeout = timeout
        if tls is None:
            self._channel = grpc.aio.insecure_channel(address, list(options))
        else:
            options = list(options)
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.aio.secure_channel(address, channel_credentials(tls), options)
        self._stub = pb_grpc.AgentServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def deploy(
        self, ref: pb.ZmachineRef, generation: int, spec: pb.ZmachineSpec
    ) -> pb.DeployResponse:
        request = pb.DeployRequest(ref=ref, generation=generation, spec=spec)
        return await self._stub.Deploy(request, timeout=self.timeout)

    async def get(self, uid: str) -> pb.Machine:
        return await self._stub.Get(pb.GetRequest(uid=uid), timeout=self.timeout)

    async def list(self) -> list[pb.Machine]:
        response = await self._stub.List(pb.ListRequest(), timeout=self.timeout)
        return list(response.machines)

    async def delete(self, uid: str) -> bool:
        response = await self._stub.Delete(pb.DeleteRequest(uid=uid), timeout=self.timeout)
        return response.existed

    async def pause(self, uid: str) -> pb.Machine:
        return await self._stub.Pause(pb.MachineRequest(uid=uid), timeout=self.timeout)

    async def resume(self, uid: str) -> pb.Machine:
        return await self._stub.Resume(pb.MachineRequest(uid=uid), timeout=self.timeout)

    async def restart(self, uid: str) -> pb.Machine:
        return await self._stub.Restart(pb.MachineRequest(uid=uid), timeout=self.timeout)

    async def node_info(self) -> pb.NodeInfoResponse:
        return await self._stub.NodeInfo(pb.NodeInfoRequest(), timeout=self.timeout)

    async def apply_network(
        self,
        network_id: str,
        peers: Sequence[pb.WireguardPeer],
        network: pb.NetworkInterface | None = None,
    ) -> pb.ApplyNetworkResponse:
        request = pb.ApplyNetworkRequest(network_id=network_id, peers=peers, network=network)
        return await self._stub.ApplyNetwork(request, timeout=self.timeout)

    async def apply_planetary(self, peers: Sequence[str]) -> pb.ApplyPlanetaryResponse:
        request = pb.ApplyPlanetaryRequest(peers=peers)
        return await self._stub.ApplyPlanetary(request, timeout=self.timeout)

    async def stats(self, uid: str) -> pb.MachineStats:
        return await self._stub.Stats(pb.MachineRequest(uid=uid), timeout=self.timeout)

    async def watch_events(self, uid: str = "") -> AsyncIterator[pb.Event]:
        """Events from now on, for one machine or (uid "") all; runs until cancelled."""
        call = self._stub.WatchEvents(pb.WatchEventsRequest(uid=uid))
        async for event in call:
            yield event

    async def attach_console(
        self, uid: str, keystrokes: AsyncIterator[pb.ConsoleInput], history: bool = True
    ) -> AsyncIterator[pb.ConsoleOutput]:
        """The shared console session: ``keystrokes`` (data/resize messages) go in, the
        history (if asked) and then live output and state changes come out."""

        async def requests() -> AsyncIterator[pb.ConsoleInput]:
            yield pb.ConsoleInput(attach=pb.ConsoleAttach(uid=uid, history=history))
            async for msg in keystrokes:
                yield msg

        async for out in self._stub.AttachConsole(requests()):
            yield out

    async def console_log(
        self, uid: str, follow: bool = False, tail_lines: int = -1
    ) -> AsyncIterator[bytes]:
        """The serial log's last ``tail_lines`` lines (all when < 0), then, with ``follow``,
        new output until cancelled."""
        request = pb.ConsoleLogRequest(uid=uid, follow=follow, tail_lines=tail_lines)
        async for out in self._stub.ConsoleLog(request):
            yield out.data
