"""The controller's two ways to the API server, both fenced by the leader's Lease deadline.

kopf sends through an aiohttp session; we give it our own (kopf's login handler may return
one, `kopf.AiohttpSession`) with a TraceConfig whose request-start hook checks the deadline,
so the check runs in the event loop right before each request of kopf and of our handlers,
after any await that a freeze could have stretched. Our own kubernetes-client calls (secret
reads, placement listing, node Leases) go through an ApiClient whose REST layer checks the
same deadline. The elector uses an ApiClient of its own, unfenced: it must work before it
leads, and it enforces the deadline itself.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import aiohttp
import kopf
import urllib3
from kubernetes import client

from controller.api.zmachine import PLURAL
from controller.api.zmachinenetwork import PLURAL as NETWORK_PLURAL
from controller.api.zmachinenode import PLURAL as NODE_PLURAL
from controller.kube import GROUP, VERSION, ApiException, before_each_request
from controller.operator.leader import LeaseFence

# kopf's defaults wait 5 min for a request and without limit for a connection; an API
# server that is gone must surface as an error within seconds so that kopf retries.
REQUEST_TIMEOUT_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 5.0
# What kopf must find at start to serve anything: our kinds, and CRDs (it watches those).
NEEDED_RESOURCES = frozenset({PLURAL, NODE_PLURAL, NETWORK_PLURAL, "customresourcedefinitions"})


@kopf.on.startup()
def network_timeouts(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.networking.request_timeout = REQUEST_TIMEOUT_SECONDS
    settings.networking.connect_timeout = CONNECT_TIMEOUT_SECONDS


def fence_api_client(api: client.ApiClient, fence: LeaseFence) -> None:
    """Check the Lease deadline in front of every request `api` sends."""
    before_each_request(api, lambda method, url, _kwargs: fence.check(method, url))


def connection_info(api: client.ApiClient) -> kopf.ConnectionInfo:
    """What the kubernetes client was configured with (in-cluster or kubeconfig)."""
    cfg = api.configuration
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix(
        "authorization"
    )
    scheme, _, token = (header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        scheme=scheme or None,
        token=token or None,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


def fenced_session(info: kopf.ConnectionInfo, fence: LeaseFence | None) -> aiohttp.ClientSession:
    trace = aiohttp.TraceConfig()
    if fence is not None:

        async def check(
            _session: aiohttp.ClientSession,
            _ctx: SimpleNamespace,
            params: aiohttp.TraceRequestStartParams,
        ) -> None:
            fence.check(params.method, str(params.url))

        trace.on_request_start.append(check)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        trace_configs=[trace],
    )


def served_resources(api: client.ApiClient) -> set[str]:
    """What the API server's discovery lists now for our group and for CRDs."""
    ours = client.CustomObjectsApi(api).get_api_resources(GROUP, VERSION)
    crds = client.ApiextensionsV1Api(api).get_api_resources()
    return {r.name for r in ours.resources} | {r.name for r in crds.resources}


def install(api: client.ApiClient, fence: LeaseFence | None) -> None:
    """Make kopf log in with `api`'s credentials through a session checked by `fence`, and
    start watching only once the API server's discovery answers."""

    @kopf.on.login()
    async def login(**_: Any) -> kopf.AiohttpSession:
        # Called again after a 401: credentials (a projected token) are read afresh.
        info = connection_info(api)
        return kopf.AiohttpSession(server=info.server, aiohttp_session=fenced_session(info, fence))

    @kopf.on.startup()
    async def discovery_answers(**_: Any) -> None:
        # kopf resolves its resources once, right after the start-up handlers: if the API
        # server is away at that moment it serves nothing until a CRD changes (logging
        # "Unresolved resources cannot be served"). So the start waits for discovery.
        try:
            found = await asyncio.to_thread(served_resources, api)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise kopf.TemporaryError(f"API discovery failed: {exc}", delay=2) from exc
        missing = NEEDED_RESOURCES - found
        if missing:
            raise kopf.TemporaryError(f"API discovery lacks {sorted(missing)}", delay=2)
