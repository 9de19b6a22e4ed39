"""Runs the real zmachine-agent as a subprocess on a loopback port (test helper)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.agent.rpc.client import AgentClient
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.rpc.tls import ClientTLS, channel_credentials
from hack.controlplane import free_port

ROOT = Path(__file__).resolve().parents[2]


def loop_backing_files() -> list[str]:
    """The backing file of every loop device on the host (a deleted one ends "(deleted)")."""
    out = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "BACK-FILE"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return [line.strip() for line in out.stdout.splitlines()]


class AgentProcess:
    """One agent: fixed state dir and port, so a restart finds what the last one left."""

    def __init__(
        self, state_dir: Path, pki: Path, extra: list[str], insecure: bool = False
    ) -> None:
        self.state_dir = state_dir
        self.pki = pki
        self.insecure = insecure
        self.port = free_port()
        self.metrics_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.extra = extra
        self.log = state_dir.parent / f"{state_dir.name}-agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}  # extra environment of the next start (fault injection)

    @property
    def tls(self) -> ClientTLS | None:
        return None if self.insecure else ClientTLS.from_dir(self.pki)

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "controller.agent.main", "serve",
            "--listen", self.address, "--state-dir", str(self.state_dir),
            "--metrics-port", str(self.metrics_port),
            *(["--insecure-dev"] if self.insecure else [
                "--tls-ca", str(self.pki / "ca.crt"),
                "--tls-cert", str(self.pki / "server.crt"),
                "--tls-key", str(self.pki / "server.key"),
            ]),
            "--hypervisor", "qemu", "--accel", "tcg",
            "--monitor-interval", "0.5", "--restart-backoff", "1",
            *self.extra,
        ]  # fmt: skip

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log_text()}")
            if self._serving():
                return
            time.sleep(0.2)
        raise TimeoutError(f"agent not serving after {timeout}s:\n{self.log_text()}")

    def _serving(self) -> bool:
        tls = self.tls
        with (
            grpc.secure_channel(self.address, channel_credentials(tls))
            if tls
            else grpc.insecure_channel(self.address)
        ) as ch:
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1
                )
            except grpc.RpcError:
                return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    def kill(self) -> None:
        """SIGKILL: the harshest agent crash; its VMs must survive it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    @contextmanager
    def running(self) -> Iterator[AgentProcess]:
        """Started agent; on exit its machines are deleted and it is stopped."""
        self.start()
        try:
            yield self
        finally:
            try:
                self.delete_all()
            finally:
                self.stop()

    def delete_all(self) -> None:
        """Delete every machine (fixture teardown): VMs outlive the agent by design, so a
        failed test must not leave them running."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()

        async def go() -> None:  # all at once: a teardown after a burst has many
            async with self.client() as c:
                await asyncio.gather(*(c.delete(m.ref.uid) for m in await c.list()))

        asyncio.run(go())

    def deploy_settled(
        self, ref: pb.ZmachineRef, generation: int, spec: pb.ZmachineSpec, timeout: float = 180
    ) -> pb.DeployResponse:
        """Deploy, then wait until the provisioning it started (in the background) is over:
        the response with the machine as Get reports it then."""
        resp = self.call("deploy", ref, generation, spec)
        assert isinstance(resp, pb.DeployResponse)
        deadline = time.monotonic() + timeout
        machine = resp.machine
        while machine.state == pb.MACHINE_STATE_PROVISIONING:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ref.uid} still provisioning after {timeout}s")
            time.sleep(0.2)
            got = self.call("get", ref.uid)
            assert isinstance(got, pb.Machine)
            machine = got
        return pb.DeployResponse(machine=machine, changed=resp.changed)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def client(self) -> AgentClient:
        return AgentClient(self.address, self.tls, timeout=180)

    def call(self, fn_name: str, *args: object) -> object:
        """Run one client call to completion from synchronous test code."""

        async def go() -> object:
            async with self.client() as c:
                return await getattr(c, fn_name)(*args)

        return asyncio.run(go())


class EventRecorder:
    """Collects WatchEvents in a background thread (its own event loop and channel)."""

    def __init__(self, agent: AgentProcess, uid: str = "") -> None:
        self.events: list[pb.Event] = []
        self._agent, self._uid = agent, uid
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._task: asyncio.Future[None] | None = None
        self._watching = threading.Event()

    async def _watch(self) -> None:
        async with self._agent.client() as c:
            async for event in c.watch_events(self._uid):
                if event.type == pb.EVENT_TYPE_WATCHING:
                    self._watching.set()
                else:
                    self.events.append(event)

    def start(self) -> None:
        self._thread.start()
        self._task = asyncio.run_coroutine_threadsafe(self._watch(), self._loop)  # type: ignore[assignment]
        # The agent says so once the subscription is in place: the test may act.
        assert self._watching.wait(30), "the agent did not open the event stream"

    def types(self) -> list[str]:
        return [pb.EventType.Name(e.type) for e in self.events]

    def stop(self) -> None:
        if self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
