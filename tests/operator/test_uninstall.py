"""The chart's post-delete cleanup, against the real API server, with exactly the RBAC the chart
grants its hook: it waits out the release's agent pods, then removes that release's
ZmachineNodes and Leases, and nothing of another release's."""

from __future__ import annotations

import json

import pytest
from kubernetes import client

from controller.agent.registration import lease_name
from controller.api.zmachinenode import PLURAL
from controller.kube import GROUP, VERSION, api_client, get_object
from controller.operator.leader import LEASE_NAME
from controller.operator.uninstall import AgentsStillRunning, remove_registrations
from hack.controlplane import ControlPlane
from tests.charts.rbac_expected import UNINSTALL_CLUSTER, UNINSTALL_NAMESPACED, Rules

AGENTS = "app.kubernetes.io/instance=uninstalled,app.kubernetes.io/component=agent"


def _role(kind: str, name: str, rules: Rules, ns: str | None) -> dict[str, object]:
    meta: dict[str, str] = {"name": name} | ({"namespace": ns} if ns else {})
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": meta,
        "rules": [
            {"apiGroups": [group], "resources": [resource], "verbs": sorted(verbs)}
            for (group, resource), verbs in rules.items()
        ],
    }


def _binding(kind: str, name: str, user: str, ns: str | None) -> dict[str, object]:
    meta: dict[str, str] = {"name": name} | ({"namespace": ns} if ns else {})
    role_kind = kind.removesuffix("Binding")
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }


@pytest.fixture
def hook_api(cluster: ControlPlane, ns: str) -> client.ApiClient:
    """A client with the hook's rules from tests/charts/rbac_expected.py, and no more."""
    user = f"uninstall-hook-{ns}"
    objects = [
        _role("ClusterRole", user, UNINSTALL_CLUSTER, None),
        _binding("ClusterRoleBinding", user, user, None),
        _role("Role", user, UNINSTALL_NAMESPACED, ns),
        _binding("RoleBinding", user, user, ns),
    ]
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    )
    return api_client(str(cluster.user_kubeconfig(user, [])))


def _register(admin: client.ApiClient, node: str, lease_ns: str) -> None:
    custom = client.CustomObjectsApi(admin)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ZmachineNode",
        "metadata": {"name": node},
        "spec": {"address": "127.0.0.1:1", "leaseNamespace": lease_ns},
    }
    custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
    client.CoordinationV1Api(admin).create_namespaced_lease(lease_ns, _lease(lease_name(node)))


def _lease(name: str) -> client.V1Lease:
    return client.V1Lease(metadata=client.V1ObjectMeta(name=name))


def _agent_pod(admin: client.ApiClient, ns: str) -> None:
    labels = dict(pair.split("=") for pair in AGENTS.split(","))
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="agent-x", labels=labels),
        spec=client.V1PodSpec(containers=[client.V1Container(name="agent", image="none")]),
    )
    client.CoreV1Api(admin).create_namespaced_pod(ns, pod)


def _nodes(admin: client.ApiClient) -> set[str]:
    listed = get_object(
        client.CustomObjectsApi(admin).list_cluster_custom_object(GROUP, VERSION, PLURAL)
    )
    return {n["metadata"]["name"] for n in listed["items"]}


def test_removes_only_the_releases_registrations_once_its_agents_are_gone(
    cluster: ControlPlane, ns: str, hook_api: client.ApiClient
) -> None:
    admin = api_client(str(cluster.kubeconfig))
    coordination = client.CoordinationV1Api(admin)
    _register(admin, f"{ns}-a", ns)
    _register(admin, f"{ns}-b", ns)
    _register(admin, f"{ns}-other", "zmachine-system")  # another release's agent
    coordination.create_namespaced_lease(ns, _lease(LEASE_NAME))
    _agent_pod(admin, ns)

    # An agent pod still there would register again: the hook refuses to go on.
    with pytest.raises(AgentsStillRunning, match="agent-x"):
        remove_registrations(hook_api, ns, AGENTS, timeout=2)
    assert {f"{ns}-a", f"{ns}-b"} <= _nodes(admin)

    # Not scheduled on any kubelet, the pod goes at once.
    client.CoreV1Api(admin).delete_namespaced_pod("agent-x", ns, grace_period_seconds=0)
    removed = remove_registrations(hook_api, ns, AGENTS, timeout=30)

    assert sorted(removed) == [f"{ns}-a", f"{ns}-b"]
    names = _nodes(admin)
    assert f"{ns}-other" in names and not names & {f"{ns}-a", f"{ns}-b"}
    assert coordination.list_namespaced_lease(ns).items == []
    coordination.read_namespaced_lease(lease_name(f"{ns}-other"), "zmachine-system")
    # A second run (Helm retries a failed hook) finds nothing and fails on nothing.
    assert remove_registrations(hook_api, ns, AGENTS, timeout=5) == []
