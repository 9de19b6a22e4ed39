"""A real helm install/upgrade/uninstall into the local kube-apiserver.

There is no kubelet or scheduler, so no pod runs; what is checked is that every object is
accepted by the API server, and what the ServiceAccounts may and may not do once bound.
The real controller and agent then run with the installed flags, env and Secret, each
authenticated by a token of its own ServiceAccount. Tests run in file order: install,
permissions, processes, upgrades, uninstall.
"""

from __future__ import annotations

import base64
import contextlib
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from controller.operator.leader import LEASE_NAME as LEADER_LEASE
from hack.controlplane import ControlPlane, free_port
from tests.charts.helm import CHART, VALUE_SETS, Helm, HelmError, kubelet_env
from tests.charts.workloads import (
    TLS_MOUNT,
    base_env,
    installed,
    process,
    python_module,
    service_account_kubeconfig,
    wait_for,
    write_secret,
)

NS = "zm-chart"  # not zmachine-system: the chart must follow the release namespace
RELEASE = "zmo"
PREFIX = f"{RELEASE}-zmachine-operator"
CONTROLLER = f"system:serviceaccount:{NS}:{PREFIX}-controller"
AGENT = f"system:serviceaccount:{NS}:{PREFIX}-agent"
CONSOLE = f"system:serviceaccount:{NS}:{PREFIX}-console"
ZM, ZMN = "zmachines.zos.threefold.io", "zmachinenodes.zos.threefold.io"
LEASES = "leases.coordination.k8s.io"
NODE = "chart-node"  # the node the agent test pretends to run on


@dataclass(frozen=True)
class Release:
    notes: str
    manifest: Path  # what `helm get manifest` listed right after the install


@pytest.fixture(scope="module")
def release(
    cluster_helm: Helm, cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Release]:
    out = cluster_helm.run("install", RELEASE, str(CHART), "-n", NS, "--create-namespace")
    manifest = tmp_path_factory.mktemp("release") / "manifest.yaml"
    manifest.write_text(cluster_helm.run("get", "manifest", RELEASE, "-n", NS))
    yield Release(out, manifest)
    with contextlib.suppress(HelmError):  # the uninstall test may have removed it already
        cluster_helm.run("uninstall", RELEASE, "-n", NS, "--no-hooks")


def _ca(cluster: ControlPlane) -> bytes:
    out = cluster.kubectl(
        "get", "secret", f"{PREFIX}-tls", "-n", NS, "-o", "jsonpath={.data.ca\\.crt}"
    )
    return base64.b64decode(out.stdout)


def _checksum(cluster: ControlPlane) -> str:
    path = "jsonpath={.spec.template.metadata.annotations.checksum/tls}"
    return cluster.kubectl("get", "daemonset", f"{PREFIX}-agent", "-n", NS, "-o", path).stdout


def test_install_creates_every_object(release: Release, cluster: ControlPlane) -> None:
    names = cluster.kubectl("get", "-f", str(release.manifest), "-o", "name").stdout.split()
    expected = {
        "serviceaccount/zmo-zmachine-operator-controller",
        "serviceaccount/zmo-zmachine-operator-agent",
        "secret/zmo-zmachine-operator-tls",
        "configmap/zmo-zmachine-operator-dashboard",
        "service/zmo-zmachine-operator-controller-metrics",
        "service/zmo-zmachine-operator-agent-metrics",
        "deployment.apps/zmo-zmachine-operator-controller",
        "daemonset.apps/zmo-zmachine-operator-agent",
        "serviceaccount/zmo-zmachine-operator-console",
        "secret/zmo-zmachine-operator-console-serving",
        "service/zmo-zmachine-operator-console",
        "deployment.apps/zmo-zmachine-operator-console",
        "apiservice.apiregistration.k8s.io/v1.subresources.zos.threefold.io",
        f"clusterrole.rbac.authorization.k8s.io/{PREFIX}-console-server",
        f"clusterrolebinding.rbac.authorization.k8s.io/{PREFIX}-console-server",
        f"rolebinding.rbac.authorization.k8s.io/{PREFIX}-console-auth-reader",
        "clusterrole.rbac.authorization.k8s.io/zmachine-console",
        "clusterrole.rbac.authorization.k8s.io/zmachine-viewer",
    }
    for component in ("controller", "agent"):
        for kind in ("clusterrole", "clusterrolebinding", "role", "rolebinding"):
            expected.add(f"{kind}.rbac.authorization.k8s.io/{PREFIX}-{component}")
    assert set(names) == expected
    assert "kubectl get zmachines -A -w" in release.notes


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_value_sets_pass_api_validation(
    release: Release, helm: Helm, cluster: ControlPlane, name: str
) -> None:
    """Every value set renders objects the API server accepts (a dry run, nothing stored)."""
    docs = helm.template(*VALUE_SETS[name], namespace=NS)
    # The Prometheus Operator's CRDs are not installed here.
    accepted = [d for d in docs if d["kind"] != "ServiceMonitor"]
    stream = yaml.safe_dump_all(accepted)
    # apply, not create: the ClusterRoles for users and the APIService have fixed names, so
    # the installed release already holds them.
    result = cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--dry-run=server",
        "-f",
        "-",
        input=stream,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == len(accepted)


# (identity, verb, resource and flags, allowed)
PERMISSIONS = [
    (CONTROLLER, "watch", (ZM, "-A"), True),
    (CONTROLLER, "patch", (ZM, "-n", "default"), True),
    (CONTROLLER, "update", (ZM, "--subresource=status", "-n", "default"), True),
    (CONTROLLER, "list", (ZMN,), True),
    (CONTROLLER, "patch", (ZMN, "--subresource=status"), True),
    (CONTROLLER, "get", ("secrets", "-n", "default"), True),
    (CONTROLLER, "create", ("events", "-n", "default"), True),
    (CONTROLLER, "patch", ("events.events.k8s.io", "-n", "default"), True),
    (CONTROLLER, "watch", ("customresourcedefinitions.apiextensions.k8s.io",), True),
    (CONTROLLER, "list", ("namespaces",), True),
    (CONTROLLER, "create", (LEASES, "-n", NS), True),
    (CONTROLLER, "update", (LEASES, "-n", NS), True),
    (CONTROLLER, "patch", (LEASES, "-n", NS), True),
    # Secrets one by one only: listing would hand over every secret in the cluster.
    (CONTROLLER, "list", ("secrets", "-n", "default"), False),
    (CONTROLLER, "watch", ("secrets", "-A"), False),
    (CONTROLLER, "delete", ("secrets", "-n", "default"), False),
    (CONTROLLER, "create", (ZM, "-n", "default"), False),
    (CONTROLLER, "delete", (ZM, "-n", "default"), False),
    (CONTROLLER, "patch", (ZMN,), True),
    (CONTROLLER, "update", (ZMN,), False),
    (CONTROLLER, "delete", (ZMN,), False),
    (CONTROLLER, "create", (LEASES, "-n", "default"), False),
    (CONTROLLER, "delete", (LEASES, "-n", NS), False),
    (CONTROLLER, "get", ("pods", "-n", NS), False),
    (CONTROLLER, "create", ("customresourcedefinitions.apiextensions.k8s.io",), False),
    (CONTROLLER, "get", ("nodes",), False),
    (AGENT, "create", (ZMN,), True),
    (AGENT, "patch", (ZMN,), True),
    (AGENT, "update", (ZMN, "--subresource=status"), True),
    (AGENT, "get", ("nodes",), True),
    (AGENT, "create", (LEASES, "-n", NS), True),
    (AGENT, "patch", (LEASES, "-n", NS), True),
    (AGENT, "get", (ZM, "-n", "default"), False),
    (AGENT, "list", (ZM, "-A"), False),
    (AGENT, "patch", (ZM, "-n", "default"), False),
    (AGENT, "update", (ZM, "--subresource=status", "-n", "default"), False),
    (AGENT, "list", (ZMN,), False),
    (AGENT, "delete", (ZMN,), False),
    (AGENT, "list", ("nodes",), False),
    (AGENT, "patch", ("nodes",), False),
    (AGENT, "get", ("secrets", "-n", NS), False),
    (AGENT, "create", (LEASES, "-n", "default"), False),
    (AGENT, "list", (LEASES, "-n", NS), False),
    (AGENT, "create", ("events", "-n", "default"), False),
    (CONSOLE, "get", (ZM, "-n", "default"), True),
    (CONSOLE, "get", (ZMN,), True),
    (CONSOLE, "create", ("subjectaccessreviews.authorization.k8s.io",), True),
    (CONSOLE, "get", ("configmaps/extension-apiserver-authentication", "-n", "kube-system"), True),
    (CONSOLE, "list", (ZM, "-A"), False),
    (CONSOLE, "patch", (ZM, "-n", "default"), False),
    (CONSOLE, "get", ("secrets", "-n", NS), False),
    (CONSOLE, "get", ("configmaps", "-n", "default"), False),
]


def _id(case: tuple[str, str, tuple[str, ...], bool]) -> str:
    who, verb, what, allowed = case
    return f"{who.rsplit('-', 1)[-1]}-{'can' if allowed else 'cannot'}-{verb}-{'_'.join(what)}"


@pytest.mark.parametrize("case", PERMISSIONS, ids=[_id(c) for c in PERMISSIONS])
def test_service_account_permissions(
    release: Release, cluster: ControlPlane, case: tuple[str, str, tuple[str, ...], bool]
) -> None:
    who, verb, what, allowed = case
    result = cluster.kubectl("auth", "can-i", verb, *what, f"--as={who}", check=False)
    assert result.stdout.strip() == ("yes" if allowed else "no"), result.stderr


def _http_text(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return None


def _forbidden(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "forbidden" in line.lower()]


def test_controller_runs_under_its_service_account(
    release: Release, cluster: ControlPlane, tmp_path: Path
) -> None:
    """The installed Deployment's flags start the real controller with only its RBAC."""
    deploy = installed(cluster, "deployment", f"{PREFIX}-controller", NS)
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    tls = write_secret(cluster, f"{PREFIX}-tls", NS, tmp_path / "tls")
    health, metrics = free_port(), free_port()
    local = {
        "--health-port": f"--health-port={health}",
        "--metrics-port": f"--metrics-port={metrics}",
        "--agent-tls-dir": f"--agent-tls-dir={tls}",
    }
    args = [local.get(arg.split("=", 1)[0], arg) for arg in container["args"]]
    kubeconfig = service_account_kubeconfig(
        cluster, f"{PREFIX}-controller", NS, tmp_path / "kubeconfig"
    )
    # Only its own namespace: other test areas' Zmachines on the shared cluster stay untouched.
    argv = [*python_module("controller.operator.main"), *args, f"--namespace={NS}"]
    env = base_env() | {"KUBECONFIG": str(kubeconfig)}
    log = tmp_path / "controller.log"
    with process(argv, env, log) as proc:
        url = f"http://127.0.0.1:{health}/healthz"
        wait_for("/healthz", lambda: _http_text(url) is not None, proc, log)
        # /healthz answers already while standing by; /metrics only once leading.
        metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        wait_for("/metrics", lambda: _http_text(metrics_url) is not None, proc, log)
        lease = installed(cluster, "lease", LEADER_LEASE, NS)
        assert lease["spec"]["holderIdentity"]
        exposition = _http_text(metrics_url) or ""
        assert "# TYPE zmachine_reconciles_total counter" in exposition
    assert _forbidden(log) == []


def test_agent_registers_its_node_under_its_service_account(
    release: Release,
    cluster: ControlPlane,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The installed DaemonSet's env starts the real agent, which registers its node."""
    ds = installed(cluster, "daemonset", f"{PREFIX}-agent", NS)
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    fields = {"spec.nodeName": NODE, "status.hostIP": "127.0.0.1", "metadata.namespace": NS}
    env = kubelet_env(container, fields)
    tls = write_secret(cluster, f"{PREFIX}-tls", NS, tmp_path / "tls")
    for key, value in env.items():
        if value.startswith(TLS_MOUNT):
            env[key] = str(tls) + value.removeprefix(TLS_MOUNT)
    metrics = free_port()
    kubeconfig = service_account_kubeconfig(cluster, f"{PREFIX}-agent", NS, tmp_path / "kc")
    env |= {
        "ZMACHINE_AGENT_LISTEN": f"127.0.0.1:{free_port()}",
        "ZMACHINE_AGENT_METRICS_PORT": str(metrics),
        # Short: the agent refuses a state dir too deep for its VMs' sockets.
        "ZMACHINE_AGENT_STATE_DIR": str(tmp_path_factory.mktemp("sa") / "state"),
        # No KVM probe guest here; the hypervisor choice does not matter to registration.
        "ZMACHINE_AGENT_HYPERVISOR": "qemu",
        "ZMACHINE_AGENT_ACCEL": "tcg",
        "ZMACHINE_AGENT_KUBECONFIG": str(kubeconfig),
    }
    log = tmp_path / "agent.log"
    argv = [*python_module("controller.agent.main"), *container["args"]]
    try:
        with process(argv, base_env() | env, log) as proc:
            wait_for("Ready ZmachineNode and heartbeat", lambda: _registered(cluster), proc, log)
            exposition = _http_text(f"http://127.0.0.1:{metrics}/metrics") or ""
            assert "# TYPE zmachine_up gauge" in exposition
    finally:
        # The node must not linger: later test areas would place Zmachines on it.
        cluster.kubectl("delete", "zmachinenode", NODE, "--ignore-not-found")
    assert _forbidden(log) == []


def _registered(cluster: ControlPlane) -> bool:
    """The agent's ZmachineNode is Ready and its heartbeat Lease is held by the node."""
    found = cluster.kubectl("get", "zmachinenode", NODE, "-o", "json", check=False)
    lease = cluster.kubectl(
        "get", "lease", f"zmachine-node-{NODE}", "-n", NS, "-o", "json", check=False
    )
    if found.returncode != 0 or lease.returncode != 0:
        return False
    node = json.loads(found.stdout)
    # The address the controller will dial: the node's IP and the chart's gRPC port.
    assert node["spec"] == {"address": "127.0.0.1:7443", "leaseNamespace": NS}
    assert json.loads(lease.stdout)["spec"]["holderIdentity"] == NODE
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def test_upgrade_keeps_the_ca(release: Release, cluster_helm: Helm, cluster: ControlPlane) -> None:
    ca, checksum = _ca(cluster), _checksum(cluster)
    cluster_helm.run("upgrade", RELEASE, str(CHART), "-n", NS, "--set", "controller.replicas=2")
    replicas = cluster.kubectl(
        "get", "deploy", f"{PREFIX}-controller", "-n", NS, "-o", "jsonpath={.spec.replicas}"
    )
    assert replicas.stdout == "2"
    assert _ca(cluster) == ca
    # Unchanged certificates must not roll the agents (and with them nothing else).
    assert _checksum(cluster) == checksum


def test_new_rotation_value_rotates_the_ca_once(
    release: Release, cluster_helm: Helm, cluster: ControlPlane
) -> None:
    ca, checksum = _ca(cluster), _checksum(cluster)
    cluster_helm.run("upgrade", RELEASE, str(CHART), "-n", NS, "--set", "tls.rotation=2026-11")
    rotated = _ca(cluster)
    assert rotated != ca
    assert _checksum(cluster) != checksum  # so the pods restart with the new files
    # A bare upgrade reuses the last values: the same stamp must not rotate again.
    cluster_helm.run("upgrade", RELEASE, str(CHART), "-n", NS)
    assert _ca(cluster) == rotated
    # Other --set flags reset the values to the defaults (empty stamp): that keeps them too.
    cluster_helm.run("upgrade", RELEASE, str(CHART), "-n", NS, "--set", "controller.replicas=1")
    assert _ca(cluster) == rotated


def test_uninstall_removes_everything(
    release: Release, cluster_helm: Helm, cluster: ControlPlane
) -> None:
    # No kubelet runs the post-delete hook's Job here (Helm would wait for it): the hook runs
    # on the real node in tests/cluster, its code under its rules in tests/operator.
    cluster_helm.run("uninstall", RELEASE, "-n", NS, "--no-hooks")
    left = cluster.kubectl("get", "-f", str(release.manifest), "--ignore-not-found", "-o", "name")
    assert left.stdout.split() == []
    history = cluster.kubectl(
        "get", "secrets", "-n", NS, "-l", f"owner=helm,name={RELEASE}", "-o", "name"
    )
    assert history.stdout.split() == []
    # The CRDs stay (Helm never deletes them): Zmachines of users must survive an uninstall.
    cluster.kubectl("get", "crd", "zmachines.zos.threefold.io")
