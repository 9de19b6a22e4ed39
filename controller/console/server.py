"""zmachine-console: the aggregated API server of Zmachine consoles.

kube-apiserver forwards ``/apis/subresources.zos.threefold.io/v1/...`` here (the chart's
APIService); this server checks that the request comes from the API server's front proxy
(auth.py), asks the API server whether the user it names may use the subresource
(SubjectAccessReview), finds the Zmachine's node and bridges the user to that node's
agent over mutual TLS. docs/console.md follows a keystroke along that path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import structlog
from aiohttp import WSMsgType, web
from kubernetes import client

from controller.agent.rpc.client import AgentClient
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.rpc.tls import ClientTLS
from controller.api import subresources
from controller.api.zmachine import GROUP, PLURAL, VERSION
from controller.api.zmachinenode import PLURAL as NODE_PLURAL
from controller.console.auth import RequestHeaderConfig, User, authorize
from controller.console.errors import (
    BadRequest,
    Conflict,
    ConsoleError,
    NotFound,
    Unavailable,
)
from controller.kube import ApiException, api_client, get_object
from controller.logs import configure_logging

log = structlog.get_logger(__name__)

RETRY_MIN, RETRY_MAX = 0.5, 5.0  # seconds between attempts to reach the agent again
# gRPC's reconnect backoff grows to 2 minutes by default; a console waits on an agent
# restart and should be back within seconds of it.
_RECONNECT = (("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 3000))
PREFIX = f"/apis/{subresources.GROUP}/{subresources.VERSION}"


def state_name(state: int) -> str:
    """``MACHINE_STATE_RUNNING`` -> ``Running`` (what clients show)."""
    return pb.MachineState.Name(state).removeprefix("MACHINE_STATE_").capitalize()  # type: ignore[arg-type]


@dataclass
class Backend:
    """Kubernetes lookups and agent clients (one per agent address)."""

    api: client.ApiClient
    agent_tls: ClientTLS | None
    _agents: dict[str, AgentClient] = field(default_factory=dict)

    async def locate(self, namespace: str, name: str) -> tuple[str, str]:
        """(uid, agent address) of the Zmachine; NotFound, or Unavailable while it has no
        node that can be reached."""
        custom = client.CustomObjectsApi(self.api)
        try:
            zm = get_object(
                await asyncio.to_thread(
                    custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                raise NotFound(f'zmachines.{GROUP} "{name}" not found') from exc
            raise Unavailable(f"reading zmachine {namespace}/{name}: {exc.reason}") from exc
        node = (zm.get("status") or {}).get("nodeName")
        if not node:
            raise Unavailable(f"zmachine {namespace}/{name} is not scheduled on a node yet")
        try:
            zmn = get_object(
                await asyncio.to_thread(
                    custom.get_cluster_custom_object, GROUP, VERSION, NODE_PLURAL, node
                )
            )
        except ApiException as exc:
            raise Unavailable(f"node {node} of zmachine {namespace}/{name}: {exc.reason}") from exc
        return str(zm["metadata"]["uid"]), str(zmn["spec"]["address"])

    def agent(self, address: str) -> AgentClient:
        if address not in self._agents:
            self._agents[address] = AgentClient(address, self.agent_tls, options=_RECONNECT)
        return self._agents[address]

    async def close(self) -> None:
        for agent in self._agents.values():
            await agent.close()


@dataclass
class Server:
    backend: Backend
    auth: RequestHeaderConfig

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_statuses])
        sub = "/namespaces/{namespace}/zmachines/{name}"
        app.add_routes(
            [
                web.get("/healthz", _ok),
                web.get("/readyz", _ok),
                web.get("/apis", self.discovery(_group_list)),
                web.get(f"/apis/{subresources.GROUP}", self.discovery(_group)),
                web.get(PREFIX, self.discovery(_resource_list)),
                web.get(f"{PREFIX}{sub}/{subresources.CONSOLE}", self.console),
                web.get(f"{PREFIX}{sub}/{subresources.LOG}", self.serial_log),
                web.put(f"{PREFIX}{sub}/{subresources.RESTART}", self.restart),
            ]
        )

        async def closing(_: web.Application) -> None:
            await self.backend.close()

        app.on_cleanup.append(closing)
        return app

    def user(self, request: web.Request) -> User:
        self.auth.proxy(request.transport.get_extra_info("peercert") if request.transport else None)
        return self.auth.user(request.headers, request.headers.getall)

    def discovery(
        self, doc: Callable[[], dict[str, Any]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            self.auth.proxy(
                request.transport.get_extra_info("peercert") if request.transport else None
            )
            return web.json_response(doc())

        return handler

    async def _target(self, request: web.Request, subresource: str) -> tuple[str, str, User]:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        user = self.user(request)
        await authorize(self.backend.api, user, namespace, name, subresource)
        # 404 before anything is streamed; a Zmachine not on a node yet is served (the
        # console shows it waiting, the log says it is unavailable).
        with contextlib.suppress(Unavailable):
            await self.backend.locate(namespace, name)
        return namespace, name, user

    async def console(self, request: web.Request) -> web.StreamResponse:
        namespace, name, user = await self._target(request, subresources.CONSOLE)
        ws = web.WebSocketResponse(heartbeat=30)
        if not ws.can_prepare(request).ok:
            raise BadRequest("the console is a websocket: connect with an Upgrade request")
        await ws.prepare(request)
        bound = log.bind(namespace=namespace, name=name, user=user.name)
        bound.info("console opened")
        session = ConsoleSession(self.backend, ws, namespace, name, bound)
        await session.run()
        bound.info("console closed")
        return ws

    async def restart(self, request: web.Request) -> web.StreamResponse:
        namespace, name, user = await self._target(request, subresources.RESTART)
        uid, address = await self.backend.locate(namespace, name)
        try:
            machine = await self.backend.agent(address).restart(uid)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise Conflict(f"zmachine {namespace}/{name}: {exc.details()}") from exc
            raise Unavailable(f"zmachine {namespace}/{name}: {_why(exc)}") from exc
        log.info("restarted", namespace=namespace, name=name, uid=uid, user=user.name)
        return web.json_response(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "message": f"zmachine {namespace}/{name} restarted ({state_name(machine.state)})",
            }
        )

    async def serial_log(self, request: web.Request) -> web.StreamResponse:
        namespace, name, user = await self._target(request, subresources.LOG)
        follow = request.query.get("follow", "false").lower() in ("true", "1")
        try:
            tail = int(request.query.get("tailLines", "-1"))
        except ValueError as exc:
            raise BadRequest(f"tailLines: not an integer: {request.query['tailLines']!r}") from exc
        bound = log.bind(namespace=namespace, name=name, user=user.name)
        bound.info("serial log", follow=follow, tail=tail)
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        first = True
        while True:
            try:
                uid, address = await self.backend.locate(namespace, name)
                chunks = self.backend.agent(address).console_log(uid, follow, tail if first else 0)
                async for data in chunks:
                    if not response.prepared:
                        await response.prepare(request)
                    await response.write(data)
                break  # not following, or the machine is gone
            except (grpc.aio.AioRpcError, Unavailable) as exc:
                if not follow:
                    raise Unavailable(f"zmachine {namespace}/{name}: {_why(exc)}") from exc
                bound.info("serial log interrupted; reconnecting", error=_why(exc))
            except NotFound:
                break
            except ConnectionResetError:
                return response  # the client left
            first = False
            if not response.prepared:
                await response.prepare(request)
            await asyncio.sleep(RETRY_MAX)
        with contextlib.suppress(ConnectionResetError):  # the client may be gone
            if not response.prepared:
                await response.prepare(request)
            await response.write_eof()
        return response


def _why(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"agent: {exc.details() or exc.code().name} ({exc.code().name})"
    return str(exc)


class ConsoleSession:
    """One websocket client on one Zmachine's console: attached to the agent of its node,
    and attached again (without the history it already has) whenever that call ends: an
    agent restart, a machine that is not on its node yet, a node that changed.

    Websocket protocol: binary frames are terminal bytes both ways; text frames are JSON,
    ``{"type": "resize", "cols", "rows"}`` from the client and
    ``{"type": "status", "state", "message"}`` from the server (the VM is not Running, or
    the agent cannot be reached: clients show a banner)."""

    def __init__(
        self,
        backend: Backend,
        ws: web.WebSocketResponse,
        namespace: str,
        name: str,
        bound: structlog.stdlib.BoundLogger,
    ) -> None:
        self.backend, self.ws, self.namespace, self.name, self.log = (
            backend,
            ws,
            namespace,
            name,
            bound,
        )
        self.inputs: asyncio.Queue[pb.ConsoleInput] = asyncio.Queue(maxsize=1024)
        self.size: pb.ConsoleResize | None = None
        self.attached = False

    async def status(self, state: str, message: str = "") -> None:
        with contextlib.suppress(ConnectionError):
            await self.ws.send_json({"type": "status", "state": state, "message": message})

    async def run(self) -> None:
        bridge = asyncio.create_task(self.bridge())
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.BINARY:
                    self.send(pb.ConsoleInput(data=msg.data))
                elif msg.type == WSMsgType.TEXT:
                    self.control(msg.data)
        finally:
            bridge.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bridge

    def send(self, msg: pb.ConsoleInput) -> None:
        # Keystrokes typed while no agent is attached are dropped, not replayed later.
        if self.attached and not self.inputs.full():
            self.inputs.put_nowait(msg)

    def control(self, text: str) -> None:
        try:
            body = json.loads(text)
            if body.get("type") == "resize":
                self.size = pb.ConsoleResize(cols=int(body["cols"]), rows=int(body["rows"]))
                self.send(pb.ConsoleInput(resize=self.size))
        except (ValueError, KeyError, TypeError, AttributeError):
            self.log.info("ignored a malformed control message", message=text[:200])

    async def keystrokes(self) -> AsyncIterator[pb.ConsoleInput]:
        if self.size is not None:
            yield pb.ConsoleInput(resize=self.size)
        while True:
            yield await self.inputs.get()

    async def bridge(self) -> None:
        history, delay = True, RETRY_MIN
        while not self.ws.closed:
            try:
                uid, address = await self.backend.locate(self.namespace, self.name)
                self.attached = True
                agent = self.backend.agent(address)
                async for out in agent.attach_console(uid, self.keystrokes(), history=history):
                    history, delay = False, RETRY_MIN
                    if out.WhichOneof("kind") == "data":
                        await self.ws.send_bytes(out.data)
                    else:
                        await self.status(state_name(out.state))
                await self.status("Unknown", "the machine left its node; looking for it")
            except NotFound:
                await self.status("Deleted", f"zmachine {self.namespace}/{self.name} is gone")
                await self.ws.close()
                return
            except (Unavailable, grpc.aio.AioRpcError) as exc:
                self.log.info("console not attached; retrying", error=_why(exc))
                await self.status("Unavailable", f"{_why(exc)}; reconnecting")
            except ConnectionError:
                return  # the client left
            finally:
                self.attached = False
                while not self.inputs.empty():
                    self.inputs.get_nowait()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)


@web.middleware
async def _statuses(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Typed errors become Kubernetes Status objects (what kubectl prints)."""
    try:
        return await handler(request)
    except ConsoleError as exc:
        log.info("request refused", path=request.path, code=exc.code, error=str(exc))
        return web.json_response(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": str(exc),
                "reason": exc.reason,
                "code": exc.code,
            },
            status=exc.code,
        )


async def _ok(_: web.Request) -> web.Response:
    return web.Response(text="ok")


def _group() -> dict[str, Any]:
    gv = {"groupVersion": f"{subresources.GROUP}/{subresources.VERSION}"}
    gv["version"] = subresources.VERSION
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": subresources.GROUP,
        "versions": [gv],
        "preferredVersion": gv,
    }


def _group_list() -> dict[str, Any]:
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group()]}


def _resource_list() -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{subresources.GROUP}/{subresources.VERSION}",
        "resources": [
            {
                "name": f"zmachines/{sub}",
                "singularName": "",
                "namespaced": True,
                "kind": "Zmachine",
                "verbs": [verb],
            }
            for sub, verb in subresources.VERBS.items()
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zmachine-console", description=__doc__)
    parser.add_argument("--listen", default="0.0.0.0:8443", help="host:port (HTTPS)")
    parser.add_argument("--tls-cert", required=True, help="serving certificate (PEM)")
    parser.add_argument("--tls-key", required=True)
    parser.add_argument(
        "--agent-tls-dir",
        type=Path,
        required=True,
        help="ca.crt, client.crt, client.key of the agents' mTLS (as the controller's)",
    )
    parser.add_argument("--agent-server-name", default=None)
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=["json", "console"], default="json")
    args = parser.parse_args(argv)
    configure_logging(args.log_level, json=args.log_format == "json")
    api = api_client(args.kubeconfig)
    try:
        auth = RequestHeaderConfig.load(api)
    except (ApiException, RuntimeError) as exc:
        log.error("cannot read the API server's request-header settings", error=str(exc))
        return 1
    tls = ClientTLS.from_dir(args.agent_tls_dir, args.agent_server_name)
    server = Server(Backend(api, tls), auth)
    host, _, port = args.listen.rpartition(":")
    log.info("serving", listen=args.listen, group=subresources.GROUP)
    web.run_app(
        server.app(),
        host=host or "0.0.0.0",
        port=int(port),
        ssl_context=auth.server_context(args.tls_cert, args.tls_key),
        print=None,
        access_log=None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
