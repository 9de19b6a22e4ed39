"""helm lint and helm template: what the chart renders for default and overridden values."""

from __future__ import annotations

import os
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from controller.agent.config import parse_config
from controller.agent.errors import InvalidSpec
from controller.agent.rpc.tls import ClientTLS, ServerTLS, channel_credentials, server_credentials
from tests.charts.helm import CHART, VALUE_SETS, Helm, Manifest, find, kubelet_env, one

# What the downward API gives a pod (release namespace zm-ops, on node-a at 192.0.2.7).
NODE_FIELDS = {
    "spec.nodeName": "node-a",
    "status.hostIP": "192.0.2.7",
    "metadata.namespace": "zm-ops",
}
# Every agent setting away from its default, so each env var visibly changes the config.
AGENT_NON_DEFAULTS = (
    "agent.listen=0.0.0.0:7555",
    "agent.stateDir=/srv/zm",
    "agent.bridge=br9",
    "agent.cidr=10.201.0.0/24",
    "agent.netns=zmnet",
    "agent.hypervisor=qemu",
    "agent.accel=tcg",
    "agent.metricsPort=9555",
    "agent.flistDirs={/srv/flists}",
    "agent.guestKernelDir=/opt/guest",
    "agent.firmware=/opt/fw/hypervisor-fw",
)


def _container(doc: Manifest) -> dict[str, Any]:
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _pod(doc: Manifest) -> dict[str, Any]:
    return dict(doc["spec"]["template"]["spec"])


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_and_template_succeed(helm: Helm, name: str) -> None:
    flags = [f for arg in VALUE_SETS[name] for f in ("--set", arg)]
    helm.run("lint", "--strict", str(CHART), *flags)
    docs = helm.template(*VALUE_SETS[name])
    for doc in docs:
        # Namespaced objects land in the release namespace, never in "default"; the one
        # exception reads the API server's request-header settings where they live.
        if doc["kind"] in ("ClusterRole", "ClusterRoleBinding", "APIService"):
            continue
        expected = "kube-system" if doc["metadata"]["name"].endswith("-auth-reader") else None
        assert doc["metadata"]["namespace"] == (expected or "zmachine-system"), doc["metadata"]
    assert {d["kind"] for d in docs} >= {"Deployment", "DaemonSet", "ServiceAccount", "Role"}


def test_controller_deployment(helm: Helm) -> None:
    deploy = one(helm.template(), "Deployment", "-controller")
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    c = _container(deploy)
    assert {"--health-port=8080", "--metrics-port=9090"} <= set(c["args"])
    # Leader election in the release namespace, where the controller's Role allows Leases.
    assert "--lease-namespace=zmachine-system" in c["args"]
    for flag in ("lease-duration=15", "renew-deadline=10", "retry-period=2"):
        assert f"--leader-elect-{flag}" in c["args"]
    tls_dir = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["tls"]
    assert f"--agent-tls-dir={tls_dir}" in c["args"]
    assert not any(a.startswith("--namespace") for a in c["args"])  # whole cluster by default
    probe = c["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 8080
    assert ports["metrics"] == 9090
    pod = _pod(deploy)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_controller_replicas_and_watched_namespaces(helm: Helm) -> None:
    deploy = one(helm.template(*VALUE_SETS["ha-namespaced"]), "Deployment", "-controller")
    assert deploy["spec"]["replicas"] == 3
    args = _container(deploy)["args"]
    assert [a for a in args if a.startswith("--namespace")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]


def test_metrics_service_selects_the_controller_pods(helm: Helm) -> None:
    docs = helm.template()
    svc = one(docs, "Service", "-controller-metrics")
    pod_labels = one(docs, "Deployment", "-controller")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]


def test_agent_daemonset_is_privileged_on_the_host(helm: Helm) -> None:
    ds = one(helm.template(), "DaemonSet", "-agent")
    pod, c = _pod(ds), _container(ds)
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    assert c["securityContext"]["privileged"] is True
    assert c["args"] == ["serve"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/dev/kvm", "/dev/fuse", "/dev/net/tun", "/var/lib/zmachine-agent", "/run"):
        host = volumes[mounts[path]["name"]]["hostPath"]["path"]
        assert host == path, f"{path} is mounted from {host}"
    # FUSE and overlay mounts under the state dir must reach the host and survive restarts.
    assert mounts["/var/lib/zmachine-agent"]["mountPropagation"] == "Bidirectional"
    assert volumes[mounts["/dev/kvm"]["name"]]["hostPath"]["type"] == "CharDevice"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}


def test_agent_scheduling_values(helm: Helm) -> None:
    ds = one(helm.template(*VALUE_SETS["tainted-nodes"]), "DaemonSet", "zmo-agent")
    pod = _pod(ds)
    assert pod["tolerations"] == [{"operator": "Exists"}]
    # Merged with the default; a boolean from --set must still render as a string.
    assert pod["nodeSelector"] == {
        "kubernetes.io/os": "linux",
        "zos.threefold.io/zmachines": "true",
    }


def test_agent_env_configures_the_real_agent(helm: Helm, monkeypatch: pytest.MonkeyPatch) -> None:
    """The env the chart sets is read by controller/agent/config.py, every variable of it."""
    ds = one(helm.template(*AGENT_NON_DEFAULTS), "DaemonSet", "-agent")
    env = kubelet_env(_container(ds), NODE_FIELDS)
    agent_env = {k: v for k, v in env.items() if k.startswith("ZMACHINE_AGENT_")}
    for key in [k for k in os.environ if k.startswith("ZMACHINE_AGENT_")]:
        monkeypatch.delenv(key)
    for key, value in agent_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")  # set in every pod
    config = parse_config([])
    assert config.listen == "0.0.0.0:7555"
    assert config.advertise_address == "192.0.2.7:7555"  # the node's address, not 0.0.0.0
    assert config.register and config.lease_namespace == "zm-ops"
    assert config.state_dir == Path("/srv/zm")
    assert config.node_name == "node-a"
    assert (config.bridge, config.cidr, config.netns) == ("br9", "10.201.0.0/24", "zmnet")
    assert (config.hypervisor, config.accel, config.metrics_port) == ("qemu", "tcg", 9555)
    assert config.flist_dirs == (Path("/srv/flists"),)
    assert config.guest_kernel_dir == Path("/opt/guest")
    assert config.firmware == Path("/opt/fw/hypervisor-fw")
    assert config.tls == ServerTLS(
        Path("/etc/zmachine/tls/ca.crt"),
        Path("/etc/zmachine/tls/server.crt"),
        Path("/etc/zmachine/tls/server.key"),
    )
    # No variable is silently ignored: dropping any one changes what the agent runs with.
    for key in agent_env:
        monkeypatch.delenv(key)
        try:
            changed = parse_config([]) != config
        except InvalidSpec:
            changed = True  # without one of the TLS files the agent refuses to start
        assert changed, f"{key} is not read by the agent"
        monkeypatch.setenv(key, agent_env[key])


def test_agent_host_directories_follow_values(helm: Helm) -> None:
    ds = one(helm.template(*AGENT_NON_DEFAULTS), "DaemonSet", "-agent")
    c, pod = _container(ds), _pod(ds)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v["hostPath"] for v in pod["volumes"] if "hostPath" in v}
    for path in ("/srv/zm", "/srv/flists", "/opt/guest", "/opt/fw/hypervisor-fw"):
        assert volumes[mounts[path]["name"]]["path"] == path
    assert mounts["/srv/flists"]["readOnly"] is True
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 7555, "metrics": 9555}


def test_agent_without_kvm_or_metrics(helm: Helm) -> None:
    docs = helm.template(*VALUE_SETS["tcg-no-metrics"])
    c = _container(one(docs, "DaemonSet", "-agent"))
    assert "/dev/kvm" not in {m["mountPath"] for m in c["volumeMounts"]}
    assert {p["name"] for p in c["ports"]} == {"grpc"}
    assert find(docs, "Service", "-agent-metrics") == []
    assert find(docs, "ConfigMap", "-dashboard") == []


def _tls_files(secret: Manifest, directory: Path) -> Path:
    import base64

    directory.mkdir()
    for key, value in secret["data"].items():
        (directory / key).write_bytes(base64.b64decode(value))
    return directory


def _health_check(server_dir: Path, client_dir: Path, server_name: str) -> str:
    """One gRPC health check over the agent's real mTLS code; returns the status or error."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    tls = ServerTLS(server_dir / "ca.crt", server_dir / "server.crt", server_dir / "server.key")
    port = server.add_secure_port("127.0.0.1:0", server_credentials(tls))
    server.start()
    try:
        creds = channel_credentials(ClientTLS.from_dir(client_dir))
        options = [("grpc.ssl_target_name_override", server_name)]
        with grpc.secure_channel(f"127.0.0.1:{port}", creds, options) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            except grpc.RpcError as exc:
                return str(exc.code())
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    finally:
        server.stop(grace=None)


def test_generated_certificates_give_working_mutual_tls(helm: Helm, tmp_path: Path) -> None:
    """Agent and controller halves of one Secret talk; a second install's CA is refused."""
    first = _tls_files(one(helm.template(), "Secret", "-tls"), tmp_path / "a")
    other = _tls_files(one(helm.template(), "Secret", "-tls"), tmp_path / "b")
    assert (first / "ca.crt").read_bytes() != (other / "ca.crt").read_bytes()
    assert _health_check(first, first, "zmachine-agent") == "SERVING"
    assert _health_check(first, other, "zmachine-agent") == "StatusCode.UNAVAILABLE"
    # The name the controller checks must be in the certificate.
    assert _health_check(first, first, "not-the-agent") == "StatusCode.UNAVAILABLE"


def test_pods_mount_only_their_half_of_the_tls_secret(helm: Helm) -> None:
    docs = helm.template()
    secret = one(docs, "Secret", "-tls")
    assert set(secret["data"]) == {"ca.crt", "server.crt", "server.key", "client.crt", "client.key"}
    wanted = {"-controller": {"ca.crt", "client.crt", "client.key"}}
    wanted["-agent"] = {"ca.crt", "server.crt", "server.key"}
    for kind, suffix in (("Deployment", "-controller"), ("DaemonSet", "-agent")):
        pod = _pod(one(docs, kind, suffix))
        (vol,) = [v for v in pod["volumes"] if v["name"] == "tls"]
        assert vol["secret"]["secretName"] == secret["metadata"]["name"]
        assert {i["key"] for i in vol["secret"]["items"]} == wanted[suffix]


def test_existing_secret_is_used_instead_of_generating(helm: Helm) -> None:
    docs = helm.template(*VALUE_SETS["existing-secret"])
    # Only the console's serving certificate is still generated (it is not the agents' PKI).
    assert [s["metadata"]["name"] for s in find(docs, "Secret")] == [
        "zm-zmachine-operator-console-serving"
    ]
    for kind, suffix in (
        ("Deployment", "-controller"),
        ("Deployment", "-console"),
        ("DaemonSet", ""),
    ):
        pod = one(docs, kind, suffix)["spec"]["template"]
        (vol,) = [v for v in pod["spec"]["volumes"] if v["name"] == "tls"]
        assert vol["secret"]["secretName"] == "my-pki"
        assert "checksum/tls" not in (pod["metadata"].get("annotations") or {})


def test_service_monitors_are_opt_in(helm: Helm) -> None:
    assert find(helm.template(), "ServiceMonitor") == []
    docs = helm.template(*VALUE_SETS["monitoring"])
    monitors = {d["metadata"]["name"]: d for d in find(docs, "ServiceMonitor")}
    assert set(monitors) == {"zm-zmachine-operator-controller", "zm-zmachine-operator-agent"}
    for name, monitor in monitors.items():
        assert monitor["metadata"]["labels"]["release"] == "prom"
        svc = one(docs, "Service", name.removeprefix("zm-zmachine-operator") + "-metrics")
        assert (
            monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        )
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_dashboard_configmap_carries_the_dashboard_file(helm: Helm) -> None:
    cm = one(helm.template(), "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    committed = (CHART / "dashboards" / "zmachine-operator.json").read_text()
    assert cm["data"]["zmachine-operator.json"] == committed.rstrip("\n")
