"""Runs the real controller and agent as the chart configures them, under their own
ServiceAccount tokens: the nearest thing to the pods when there is no kubelet."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hack.controlplane import ControlPlane
from tests.charts.helm import REPO

TLS_MOUNT = "/etc/zmachine/tls"


def installed(cluster: ControlPlane, kind: str, name: str, namespace: str) -> dict[str, Any]:
    out = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout
    return dict(json.loads(out))


def write_secret(cluster: ControlPlane, name: str, namespace: str, directory: Path) -> Path:
    """The Secret's files as the pod's secret volume would show them."""
    directory.mkdir(parents=True, exist_ok=True)
    for key, value in installed(cluster, "secret", name, namespace)["data"].items():
        path = directory / key
        path.write_bytes(base64.b64decode(value))
        path.chmod(0o600)
    return directory


def service_account_kubeconfig(
    cluster: ControlPlane, account: str, namespace: str, path: Path
) -> Path:
    """A kubeconfig with a real token of the ServiceAccount (TokenRequest API)."""
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=1h")
    return cluster.token_kubeconfig(path, token.stdout.strip())


@contextmanager
def process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=out
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(
    what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {what}:\n{log.read_text()}")
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"no {what} after 90 s:\n{log.read_text()[-4000:]}")


def base_env() -> dict[str, str]:
    """This process's environment without anything that would configure the children."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ZMACHINE_", "KUBERNETES_")) and k != "KUBECONFIG"
    }


def python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]
