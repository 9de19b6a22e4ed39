"""The rendered RBAC: exactly the rules of rbac_expected.py, no wildcards, bound to the pods."""

from __future__ import annotations

import pytest

from tests.charts.helm import Helm, Manifest, find, one
from tests.charts.rbac_expected import EXPECTED, USER_ROLES, Rules


@pytest.fixture(scope="module")
def docs(helm: Helm) -> list[Manifest]:
    return helm.template()


def _flatten(role: Manifest) -> Rules:
    merged: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        # Neither name restrictions nor raw URLs are part of the design; fail loudly if added.
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                merged.setdefault((group, resource), set()).update(rule["verbs"])
    return {key: frozenset(verbs) for key, verbs in merged.items()}


def test_no_wildcards(docs: list[Manifest]) -> None:
    for role in find(docs, "ClusterRole") + find(docs, "Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert not any("*" in item for item in rule[field]), (role["metadata"], rule)


@pytest.mark.parametrize(("kind", "component"), sorted(EXPECTED))
def test_exact_rules(docs: list[Manifest], kind: str, component: str) -> None:
    assert _flatten(one(docs, kind, f"-{component}")) == EXPECTED[(kind, component)]


def test_only_the_expected_roles_exist(docs: list[Manifest]) -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in find(docs, "ClusterRole")}
    names |= {(d["kind"], d["metadata"]["name"]) for d in find(docs, "Role")}
    assert names == {(k, f"zm-zmachine-operator-{c}") for k, c in EXPECTED} | {
        ("ClusterRole", name) for name in USER_ROLES
    }
    assert {r["metadata"]["namespace"] for r in find(docs, "Role")} == {"zmachine-system"}


@pytest.mark.parametrize("name", sorted(USER_ROLES))
def test_user_roles(docs: list[Manifest], name: str) -> None:
    (role,) = [r for r in find(docs, "ClusterRole") if r["metadata"]["name"] == name]
    assert _flatten(role) == USER_ROLES[name]


def test_console_server_reads_the_request_header_settings_only(docs: list[Manifest]) -> None:
    """extension-apiserver-authentication-reader in kube-system: the one ConfigMap."""
    binding = one(docs, "RoleBinding", "-console-auth-reader")
    assert binding["metadata"]["namespace"] == "kube-system"
    assert binding["roleRef"]["name"] == "extension-apiserver-authentication-reader"
    sa = one(docs, "Deployment", "-console")["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa, "namespace": "zmachine-system"}
    ]


@pytest.mark.parametrize(
    ("workload", "component", "roles"),
    [
        ("Deployment", "controller", "controller"),
        ("DaemonSet", "agent", "agent"),
        ("Deployment", "console", "console-server"),
        ("Job", "uninstall", "uninstall"),
    ],
)
def test_roles_are_bound_to_the_pods_service_account(
    docs: list[Manifest], workload: str, component: str, roles: str
) -> None:
    sa = one(docs, workload, f"-{component}")["spec"]["template"]["spec"]["serviceAccountName"]
    assert one(docs, "ServiceAccount", f"-{component}")["metadata"]["name"] == sa
    # The console server has no Role: it holds no Lease.
    for kind in ("ClusterRole", "Role") if roles != "console-server" else ("ClusterRole",):
        binding = one(docs, f"{kind}Binding", f"-{roles}")
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": kind,
            "name": one(docs, kind, f"-{roles}")["metadata"]["name"],
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa, "namespace": "zmachine-system"}
        ]
