"""The RBAC the chart must grant, and nothing more (docs/install.md has the same table)."""

from __future__ import annotations

# (apiGroup, resource) -> verbs, per ClusterRole/Role name suffix.
Rules = dict[tuple[str, str], frozenset[str]]
ZOS = "zos.threefold.io"


def _rules(*rows: tuple[str, str, str]) -> Rules:
    return {(group, resource): frozenset(verbs.split()) for group, resource, verbs in rows}


CONTROLLER_CLUSTER = _rules(
    (ZOS, "zmachines", "get list watch patch update"),
    (ZOS, "zmachines/status", "get patch update"),
    (ZOS, "zmachinenodes", "get list watch patch"),
    (ZOS, "zmachinenodes/status", "get patch update"),
    (ZOS, "zmachinenetworks", "get list watch patch update"),
    (ZOS, "zmachinenetworks/status", "get patch update"),
    (ZOS, "zmachinepublicippools", "list"),
    (ZOS, "zmachinepublicippools/status", "patch"),
    ("", "events", "create patch"),
    ("events.k8s.io", "events", "create patch"),
    ("", "secrets", "get"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list watch"),
    ("", "namespaces", "list watch"),
)
# Leases are renewed with patch (controller/operator/leader.py, controller/agent/registration.py).
CONTROLLER_NAMESPACED = _rules(
    ("coordination.k8s.io", "leases", "get list watch create update patch")
)
AGENT_CLUSTER = _rules(
    (ZOS, "zmachinenodes", "get create update patch"),
    (ZOS, "zmachinenodes/status", "get patch update"),
    ("", "nodes", "get"),
)
AGENT_NAMESPACED = _rules(("coordination.k8s.io", "leases", "get create update patch"))
# The post-delete hook (templates/uninstall-hook.yaml): the agents' registrations go once the
# agent pods are gone.
UNINSTALL_CLUSTER = _rules((ZOS, "zmachinenodes", "list delete"))
UNINSTALL_NAMESPACED = _rules(("", "pods", "list"), ("coordination.k8s.io", "leases", "delete"))
SUB = "subresources.zos.threefold.io"
# The console server: find a Zmachine and its node, ask whether a user may use it.
CONSOLE_CLUSTER = _rules(
    (ZOS, "zmachines", "get"),
    (ZOS, "zmachinenodes", "get"),
    ("authorization.k8s.io", "subjectaccessreviews", "create"),
)
EXPECTED: dict[tuple[str, str], Rules] = {
    ("ClusterRole", "controller"): CONTROLLER_CLUSTER,
    ("Role", "controller"): CONTROLLER_NAMESPACED,
    ("ClusterRole", "agent"): AGENT_CLUSTER,
    ("Role", "agent"): AGENT_NAMESPACED,
    ("ClusterRole", "console-server"): CONSOLE_CLUSTER,
    ("ClusterRole", "uninstall"): UNINSTALL_CLUSTER,
    ("Role", "uninstall"): UNINSTALL_NAMESPACED,
}
# ClusterRoles for users to bind (docs/console.md), by their fixed names.
USER_ROLES: dict[str, Rules] = {
    "zmachine-console": _rules(
        (SUB, "zmachines/console", "get"),
        (SUB, "zmachines/log", "get"),
        (SUB, "zmachines/restart", "update"),
        (ZOS, "zmachines", "get list watch"),
    ),
    "zmachine-viewer": _rules((SUB, "zmachines/log", "get"), (ZOS, "zmachines", "get list watch")),
}
