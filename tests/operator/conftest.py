"""The controller, run as a user would run it: its own process against the real API server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import kopf
import pytest
from kopf._core.engines import posting

from controller.kube import api_client
from controller.operator.kubeapi import Kube
from hack.controlplane import ControlPlane, free_port
from tests.operator.doubles import EventLog, World

T = TypeVar("T")


@dataclass
class RunningController:
    process: subprocess.Popen[bytes]
    metrics_port: int
    health_port: int
    log: Path

    def healthz(self) -> str | None:
        """The liveness body, or None when nothing answers."""
        if self.process.poll() is not None:
            raise AssertionError(f"controller exited: {self.log.read_text()[-3000:]}")
        url = f"http://127.0.0.1:{self.health_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                body: bytes = response.read()
                return body.decode()
        except OSError:
            return None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_controller(cluster: ControlPlane, ns: str, log: Path, *extra: str) -> RunningController:
    """A controller that watches only `ns` and elects its leader there."""
    metrics_port, health_port = free_port(), free_port()
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    argv = [
        sys.executable,
        "-m",
        "controller.operator.main",
        "--agent-insecure-dev",
        "--metrics-port",
        str(metrics_port),
        "--health-port",
        str(health_port),
        "--namespace",
        ns,
        "--lease-namespace",
        ns,
        *extra,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    return RunningController(proc, metrics_port, health_port, log)


@pytest.fixture(scope="module")
def controller(
    cluster: ControlPlane, ns: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningController]:
    log = tmp_path_factory.mktemp("controller") / "controller.log"
    running = start_controller(cluster, ns, log)
    try:
        wait_for(running.healthz, timeout=60, what="the controller's liveness endpoint")
        yield running
    finally:
        running.stop()


def wait_for(
    predicate: Callable[[], T | bool | None],
    timeout: float = 60.0,
    interval: float = 0.5,
    what: str = "condition",
    on_timeout: Callable[[], str] | None = None,
) -> T:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last  # type: ignore[return-value]
        time.sleep(interval)
    detail = on_timeout() if on_timeout else f"last value: {last!r}"
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; {detail}")


@pytest.fixture
def events() -> Iterator[list[posting.K8sEvent]]:
    log = EventLog()
    tokens = [posting.settings_var.set(kopf.OperatorSettings()), posting.event_queue_var.set(log)]
    yield log.seen
    for token in reversed(tokens):
        token.var.reset(token)  # type: ignore[attr-defined]


@pytest.fixture
def world(cluster: ControlPlane, ns: str) -> World:
    return World(cluster, ns, Kube(api_client(str(cluster.kubeconfig))))


@pytest.fixture
def named(world: World, request: pytest.FixtureRequest) -> Iterator[str]:
    """A Zmachine name from the test's own (parameters included), removed afterwards."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.removeprefix("test_"))[:50].strip("-")
    yield name
    world.cleanup(name)
