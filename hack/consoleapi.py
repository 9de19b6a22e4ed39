"""Runs the console server (controller/console) next to a local control plane and
registers it with the aggregation layer, as the chart does in a cluster.

kube-apiserver reaches an APIService through its Service. Here nothing routes Service IPs,
so the Service is an ExternalName pointing at loopback (the aggregator dials it directly,
checking the serving certificate against the APIService's caBundle and the name
``<service>.<namespace>.svc``). Used by `make run` and the console tests.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from controller.agent.rpc.tls import write_dev_pki
from controller.api import subresources
from hack.controlplane import ControlPlane, free_port

NAMESPACE = "zmachine-system"
SERVICE = "zmachine-console"
APISERVICE = f"{subresources.VERSION}.{subresources.GROUP}"


@dataclass
class ConsoleServer:
    cluster: ControlPlane
    workdir: Path
    agent_tls_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def pki(self) -> Path:
        return self.workdir / "console-pki"

    def argv(self) -> list[str]:
        """The server's command line (its serving certificate made on first use)."""
        if not (self.pki / "server.crt").exists():
            write_dev_pki(self.pki, (f"{SERVICE}.{NAMESPACE}.svc",), client_name="unused")
        return [
            sys.executable, "-m", "controller.console.server",
            "--listen", f"127.0.0.1:{self.port}",
            "--tls-cert", str(self.pki / "server.crt"), "--tls-key", str(self.pki / "server.key"),
            "--agent-tls-dir", str(self.agent_tls_dir),
            "--kubeconfig", str(self.cluster.kubeconfig),
        ]  # fmt: skip

    def start(self, timeout: float = 90.0) -> None:
        """Run the server as a child of this process, then publish it."""
        self._run()
        self.publish(timeout)

    def restart(self, timeout: float = 90.0) -> None:
        """Stop and start the process; the APIService stays registered meanwhile."""
        self._terminate()
        self._run()
        self.wait_available(timeout)

    def _run(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv(), stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip

    def publish(self, timeout: float = 90.0) -> None:
        """Register the server's APIService and wait until the API server finds it Available."""
        self.register((self.pki / "ca.crt").read_bytes())
        self.wait_available(timeout)

    def register(self, ca_bundle: bytes) -> None:
        objects = [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": SERVICE, "namespace": NAMESPACE},
                "spec": {"type": "ExternalName", "externalName": "127.0.0.1"},
            },
            {
                "apiVersion": "apiregistration.k8s.io/v1",
                "kind": "APIService",
                "metadata": {"name": APISERVICE},
                "spec": {
                    "group": subresources.GROUP,
                    "version": subresources.VERSION,
                    "service": {"namespace": NAMESPACE, "name": SERVICE, "port": self.port},
                    "caBundle": base64.b64encode(ca_bundle).decode(),
                    "groupPriorityMinimum": 1000,
                    "versionPriority": 15,
                },
            },
        ]
        self.cluster.kubectl("create", "namespace", NAMESPACE, check=False)
        for obj in objects:
            self.cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))

    def wait_available(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"console server exited:\n{self.log.read_text()[-3000:]}")
            got = self.cluster.get("apiservice", APISERVICE) or {}
            for cond in (got.get("status") or {}).get("conditions") or []:
                if cond["type"] == "Available":
                    if cond["status"] == "True":
                        return
                    last = f"{cond.get('reason')}: {cond.get('message')}"
            time.sleep(0.5)
        raise TimeoutError(f"APIService {APISERVICE} not Available after {timeout}s: {last}")

    def stop(self) -> None:
        self._terminate()
        self.cluster.kubectl("delete", "apiservice", APISERVICE, "--ignore-not-found")

    def _terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
