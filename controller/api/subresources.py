"""The aggregated API that serves Zmachine consoles (controller/console, docs/console.md).

Users reach it through kube-apiserver, which authenticates them and forwards the request
to the console server; RBAC on these subresources decides who may read or type.
"""

from __future__ import annotations

GROUP = "subresources.zos.threefold.io"
VERSION = "v1"
CONSOLE = "console"  # websocket: read and type (zmachines/console)
LOG = "log"  # the serial log, with follow (zmachines/log)
RESTART = "restart"  # PUT: the node restarts the VM (zmachines/restart, verb update)
VERBS = {CONSOLE: "get", LOG: "get", RESTART: "update"}


def path(namespace: str, name: str, subresource: str) -> str:
    """The API path of a Zmachine's subresource (what status.consoleURL holds)."""
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/zmachines/{name}/{subresource}"
