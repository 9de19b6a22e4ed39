"""The controller, run as a user would run it: its own process against the real API server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from hack.controlplane import ControlPlane, free_port

T = TypeVar("T")


@dataclass
class RunningController:
    process: subprocess.Popen[bytes]
    metrics_port: int
    health_port: int
    log: Path


@pytest.fixture(scope="module")
def controller(
    cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningController]:
    log = tmp_path_factory.mktemp("controller") / "controller.log"
    metrics_port, health_port = free_port(), free_port()
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controller.operator.main",
                "--agent-insecure-dev",
                "--metrics-port",
                str(metrics_port),
                "--health-port",
                str(health_port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    running = RunningController(proc, metrics_port, health_port, log)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"controller exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_for(healthy, timeout=60, what="the controller's liveness endpoint")
        yield running
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_for(
    predicate: Callable[[], T | bool | None],
    timeout: float = 60.0,
    interval: float = 0.5,
    what: str = "condition",
) -> T:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last  # type: ignore[return-value]
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
