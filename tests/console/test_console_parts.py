"""The console server's and the plugin's pieces that need no cluster: the request-header
settings, the user named by the front proxy, and kubectl-style error messages."""

from __future__ import annotations

import json

import pytest
from multidict import CIMultiDict

from controller.console.auth import RequestHeaderConfig
from controller.console.errors import Unauthorized
from controller.console.plugin import status_error

CONFIGMAP = {
    "requestheader-client-ca-file": "-----BEGIN CERTIFICATE-----\n...",
    "requestheader-allowed-names": '["front-proxy-client"]',
    "requestheader-username-headers": '["X-Remote-User"]',
    "requestheader-group-headers": '["X-Remote-Group"]',
    "requestheader-extra-headers-prefix": '["X-Remote-Extra-"]',
}


def _peer(cn: str) -> dict[str, object]:
    return {"subject": ((("organizationName", "x"),), (("commonName", cn),))}


def test_only_an_allowed_front_proxy_certificate_is_believed() -> None:
    auth = RequestHeaderConfig.from_configmap(CONFIGMAP)
    auth.proxy(_peer("front-proxy-client"))
    for peer in (None, {}, _peer("alice")):
        with pytest.raises(Unauthorized):
            auth.proxy(peer)


def test_without_the_aggregation_layer_the_server_says_what_is_missing() -> None:
    with pytest.raises(RuntimeError, match="requestheader-client-ca-file"):
        RequestHeaderConfig.from_configmap({})


def test_user_groups_and_extra_come_from_the_configured_headers() -> None:
    auth = RequestHeaderConfig.from_configmap(CONFIGMAP)
    headers: CIMultiDict[str] = CIMultiDict()
    headers.add("X-Remote-User", "alice")
    headers.add("X-Remote-Group", "dev")
    headers.add("X-Remote-Group", "system:authenticated")
    headers.add("X-Remote-Extra-Scopes", "a")
    headers.add("X-Remote-Extra-Scopes", "b")
    headers.add("X-Other", "ignored")
    user = auth.user(headers, headers.getall)
    assert user.name == "alice"
    assert user.groups == ["dev", "system:authenticated"]
    assert user.extra == {"scopes": ["a", "b"]}
    with pytest.raises(Unauthorized):
        auth.user(CIMultiDict(), CIMultiDict().getall)


def test_errors_read_as_kubectl_prints_them() -> None:
    forbidden = {"kind": "Status", "reason": "Forbidden", "message": 'x "a" is forbidden: no'}
    assert str(status_error(403, json.dumps(forbidden))) == (
        'Error from server (Forbidden): x "a" is forbidden: no'
    )
    assert str(status_error(401, "")) == (
        "error: You must be logged in to the server (Unauthorized)"
    )
    assert str(status_error(502, "bad gateway")) == "Error from server: bad gateway"
    assert status_error(503, "").code == 503
