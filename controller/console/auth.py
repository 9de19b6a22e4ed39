"""Who is asking: the API server's front proxy, vouched for by the request-header client CA,
names the user in headers; a SubjectAccessReview says whether that user may do it.

The CA, the allowed proxy names and the header names are the API server's own, read from
the ``kube-system/extension-apiserver-authentication`` ConfigMap as every extension API
server does, so they never drift from the API server's flags.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client

from controller.api import subresources
from controller.console.errors import Forbidden, Unauthorized

AUTH_CONFIGMAP = ("kube-system", "extension-apiserver-authentication")


@dataclass(frozen=True)
class User:
    name: str
    groups: list[str] = field(default_factory=list)
    extra: dict[str, list[str]] = field(default_factory=dict)
    uid: str = ""


@dataclass(frozen=True)
class RequestHeaderConfig:
    """The API server's --requestheader-* settings."""

    client_ca: str  # PEM
    allowed_names: list[str]
    username_headers: list[str]
    group_headers: list[str]
    extra_prefixes: list[str]
    uid_headers: list[str] = field(default_factory=list)

    @classmethod
    def from_configmap(cls, data: Mapping[str, str]) -> RequestHeaderConfig:
        def names(key: str) -> list[str]:
            return [str(v) for v in json.loads(data.get(key) or "[]")]

        ca = data.get("requestheader-client-ca-file", "")
        if not ca:
            raise RuntimeError(
                f"{'/'.join(AUTH_CONFIGMAP)} has no requestheader-client-ca-file: start "
                "kube-apiserver with --requestheader-client-ca-file (the aggregation layer)"
            )
        return cls(
            client_ca=ca,
            allowed_names=names("requestheader-allowed-names"),
            username_headers=names("requestheader-username-headers"),
            group_headers=names("requestheader-group-headers"),
            extra_prefixes=names("requestheader-extra-headers-prefix"),
            uid_headers=names("requestheader-uid-headers"),
        )

    @classmethod
    def load(cls, api: client.ApiClient) -> RequestHeaderConfig:
        cm = client.CoreV1Api(api).read_namespaced_config_map(AUTH_CONFIGMAP[1], AUTH_CONFIGMAP[0])
        return cls.from_configmap(cm.data or {})

    def server_context(self, cert: str, key: str) -> ssl.SSLContext:
        """TLS for the console server: client certificates are asked for and, when given,
        must chain to the request-header CA (checked again per request in ``user``)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cadata=self.client_ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def proxy(self, peercert: Mapping[str, Any] | None) -> None:
        """Refuse (401) anything but the API server's front proxy."""
        if not peercert:
            raise Unauthorized("a client certificate from the request-header CA is required")
        cn = next(
            (v for rdn in peercert.get("subject", ()) for k, v in rdn if k == "commonName"), ""
        )
        if self.allowed_names and cn not in self.allowed_names:
            raise Unauthorized(f"client certificate {cn!r} is not an allowed front proxy")

    def user(self, headers: Mapping[str, str], getall: Any) -> User:
        """The user the front proxy names (after ``proxy`` accepted the connection)."""
        name = next((headers[h] for h in self.username_headers if headers.get(h)), "")
        if not name:
            raise Unauthorized("no user named by the front proxy")
        groups = [g for h in self.group_headers for g in getall(h, [])]
        extra: dict[str, list[str]] = {}
        for key in headers:
            for prefix in self.extra_prefixes:
                if key.lower().startswith(prefix.lower()):
                    extra.setdefault(key[len(prefix) :].lower(), []).extend(getall(key, []))
        uid = next((headers[h] for h in self.uid_headers if headers.get(h)), "")
        return User(name, groups, extra, uid)


async def authorize(
    api: client.ApiClient, user: User, namespace: str, name: str, subresource: str
) -> None:
    """SubjectAccessReview: may ``user`` use zmachines/<subresource> ``name`` (with the
    subresource's verb, subresources.VERBS)? Else 403."""
    verb = subresources.VERBS[subresource]
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=user.name,
            groups=user.groups,
            extra=user.extra or None,
            uid=user.uid or None,
            resource_attributes=client.V1ResourceAttributes(
                group=subresources.GROUP,
                version=subresources.VERSION,
                resource="zmachines",
                subresource=subresource,
                verb=verb,
                namespace=namespace,
                name=name,
            ),
        )
    )
    authz = client.AuthorizationV1Api(api)
    result = await asyncio.to_thread(authz.create_subject_access_review, review)
    status = result.status
    if status is None or not status.allowed:
        raise Forbidden(
            f'zmachines.{subresources.GROUP} "{name}" is forbidden: User "{user.name}" '
            f'cannot {verb} resource "zmachines/{subresource}" in API group '
            f'"{subresources.GROUP}" in the namespace "{namespace}"'
            + (f": {status.reason}" if status is not None and status.reason else "")
        )
