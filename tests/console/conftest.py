"""The console end to end: the real kube-apiserver with its aggregation layer, the console
server registered as an APIService, the controller, one agent booting a busybox shell under
QEMU/TCG, users bound (or not) to the chart's ClusterRoles."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from hack.consoleapi import ConsoleServer
from hack.controlplane import ControlPlane, virtiofsd_path
from tests.agent.agent_harness import AgentProcess
from tests.agent.conftest import agent_busybox_flist, agent_guest_dir, agent_pki
from tests.charts.helm import Helm, build_helm
from tests.e2e.conftest import start_controller
from tests.faults.invariants import leaks
from tests.netns import bridged_netns
from tests.operator.conftest import wait_for

__all__ = ["agent_busybox_flist", "agent_guest_dir", "agent_pki"]

REPO = Path(__file__).resolve().parents[2]
NODE = "console-node"
NAME = "hello"
ARTIFACTS = Path(os.environ.get("ZM_TEST_ARTIFACTS", REPO / ".cache" / "test-artifacts"))


@dataclass
class ConsoleEnv:
    cluster: ControlPlane
    ns: str
    other_ns: str
    agent: AgentProcess
    controller: subprocess.Popen[bytes]
    controller_log: Path
    server: ConsoleServer
    kubeconfigs: dict[str, Path]  # user -> kubeconfig

    def env(self, user: str) -> dict[str, str]:
        """Environment of a `kubectl zmachine` run as ``user`` (the plugin on PATH)."""
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfigs[user]),
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        }

    def plugin(
        self, user: str, *args: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """`kubectl zmachine ARGS` as ``user``, through the real kubectl's plugin lookup."""
        return subprocess.run(
            [self.kubectl_path, "zmachine", "-n", self.ns, *args],
            env=self.env(user), capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    @property
    def kubectl_path(self) -> str:
        return str(self.cluster.assets / "kubectl")

    def status(self) -> dict[str, Any]:
        return ((self.cluster.get("zm", NAME, self.ns) or {}).get("status")) or {}


def _user_roles(helm_home: Path) -> list[dict[str, Any]]:
    """The chart's ClusterRoles for users, rendered by the real helm."""
    docs = Helm(build_helm(), helm_home).template()
    return [
        d
        for d in docs
        if d["kind"] == "ClusterRole"
        and d["metadata"]["name"] in ("zmachine-console", "zmachine-viewer")
    ]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def expired(token: str, sa_key: Path) -> str:
    """The same service-account token, expired a minute ago, signed again with the cluster's
    own signing key: only its expiry makes the API server refuse it."""
    header, payload, _ = token.split(".")
    claims = json.loads(_unb64(payload))
    now = int(time.time())
    claims.update(iat=now - 3600, nbf=now - 3600, exp=now - 60)
    signing_input = f"{header}.{_b64(json.dumps(claims).encode())}".encode()
    key = serialization.load_pem_private_key(sa_key.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input.decode()}.{_b64(signature)}"


def _manifest(ns: str, flist: Path) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "zos.threefold.io/v1alpha1",
            "kind": "Zmachine",
            "metadata": {"name": NAME, "namespace": ns},
            "spec": {
                "flist": f"file://{flist}",
                "computeCapacity": {"cpu": 1, "memory": "256Mi"},
                # An interactive shell on the serial console (our init runs the entrypoint
                # in the foreground with the console as its terminal).
                "entrypoint": "/bin/sh",
            },
        }
    )


@pytest.fixture(scope="module")
def console_env(
    cluster: ControlPlane,
    ns: str,
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_guest_dir: Path,
    agent_busybox_flist: Path,
) -> Iterator[ConsoleEnv]:
    base = tmp_path_factory.mktemp("con")  # short: virtiofsd sockets live below it (SUN_LEN)
    other_ns = f"{ns}-other"
    cluster.kubectl("create", "namespace", other_ns, check=False)
    roles = _user_roles(base / "helm-home")
    for role in roles:
        cluster.kubectl("apply", "-f", "-", input=json.dumps(role))
    kubeconfigs = {u: cluster.user_kubeconfig(u, []) for u in ("alice", "bob", "carol")}
    # alice may use the console in ns (and nowhere else), carol may read the log, bob nothing.
    cluster.kubectl("create", "rolebinding", "alice-console", "-n", ns,
                    "--clusterrole=zmachine-console", "--user=alice")  # fmt: skip
    cluster.kubectl("create", "rolebinding", "carol-viewer", "-n", ns,
                    "--clusterrole=zmachine-viewer", "--user=carol")  # fmt: skip
    cluster.kubectl("create", "serviceaccount", "dave", "-n", ns)
    cluster.kubectl("create", "rolebinding", "dave-console", "-n", ns,
                    "--clusterrole=zmachine-console", f"--serviceaccount={ns}:dave")  # fmt: skip
    token = cluster.kubectl("create", "token", "dave", "-n", ns, "--duration=1h").stdout.strip()
    kubeconfigs["dave"] = cluster.token_kubeconfig(base / "kubeconfig-dave", token)
    kubeconfigs["dave-expired"] = cluster.token_kubeconfig(
        base / "kubeconfig-dave-expired", expired(token, cluster.pki / "sa.key")
    )
    kubeconfigs["anonymous"] = cluster.token_kubeconfig(base / "kubeconfig-anonymous", None)

    with contextlib.ExitStack() as stack:
        netns = stack.enter_context(bridged_netns("zmcon", "zmbr0", "10.236.0.1/16"))
        agent = AgentProcess(base / "n", agent_pki, [])
        agent.extra = [
            "--node-name", NODE, "--cidr", "10.236.1.0/24", "--bridge", "zmbr0",
            "--netns", netns, "--guest-kernel-dir", str(agent_guest_dir),
            "--flist-dir", str(agent_busybox_flist.parent),
            "--kubeconfig", str(cluster.kubeconfig), "--advertise-address", agent.address,
            "--lease-namespace", "zmachine-system", "--virtiofsd", str(virtiofsd_path()),
        ]  # fmt: skip
        log = base / "controller.log"
        controller = start_controller(cluster, agent_pki, ns, log)
        server = ConsoleServer(cluster, base, agent_pki)

        def teardown() -> None:
            # The controller deletes it through the agent, which must leave nothing behind;
            # only if it did not does the offline sweep run, so later tests start clean.
            deleted = cluster.kubectl("delete", "zm", NAME, "-n", ns, "--timeout=120s",
                                      check=False)  # fmt: skip
            left = leaks([agent.state_dir], netns)
            controller.terminate()
            controller.wait(30)
            agent.stop()
            server.stop()
            if deleted.returncode or left:
                sweep(agent)
            # Cluster-wide and not helm's: a chart installed later in the session owns them.
            for role in roles:
                cluster.kubectl("delete", "clusterrole", role["metadata"]["name"], check=False)
            assert deleted.returncode == 0, f"deleting {NAME}: {deleted.stderr}"
            assert left == [], f"deleting {NAME} left {left}"

        stack.callback(teardown)
        agent.start()
        server.start()
        env = ConsoleEnv(cluster, ns, other_ns, agent, controller, log, server, kubeconfigs)
        cluster.kubectl("apply", "-f", "-", input=_manifest(ns, agent_busybox_flist))
        try:
            wait_for(
                lambda: env.status().get("phase") == "Running",
                timeout=240, interval=1, what=f"{NAME} Running",
            )  # fmt: skip
        except AssertionError:
            print(log.read_text()[-4000:], agent.log_text())
            raise
        yield env


def sweep(agent: AgentProcess) -> None:
    """Offline, as `make down` does: whatever a failed Delete left (VMMs, mounts, loop
    devices and helpers outlive the agent by design) must not outlive the test."""
    for _ in range(3):  # a killed helper's mounts may take a moment to go
        swept = subprocess.run(
            [sys.executable, "-m", "controller.agent.main", "cleanup", *agent.argv()[4:]],
            check=False, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if swept.returncode == 0:
            return
        print("agent cleanup:", swept.stderr[-3000:], "holders:", _holders(agent.state_dir))
        time.sleep(2)


def _holders(state_dir: Path) -> list[str]:
    """Processes in another mount namespace that still holds a mount under ``state_dir``
    (what keeps a root image's loop device busy after the agent unmounted it)."""
    found = []
    ours = os.readlink("/proc/self/ns/mnt")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            other_ns = os.readlink(proc / "ns" / "mnt") != ours
            if other_ns and str(state_dir) in (proc / "mountinfo").read_text():
                found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:150]!r}")
        except OSError:
            continue
    return found
