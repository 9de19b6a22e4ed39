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

from types import SimpleNamespace
from typing import Any

import aiohttp
import kopf
from kubernetes import client

from controller.kube import before_each_request
from controller.operator.leader import LeaseFence

# kopf's defaults wait 5 min for a request and without limit for a connection; an API
# server that is gone must surface as an error within seconds so that kopf retries.
REQUEST_TIMEOUT_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 5.0


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


def install_login(api: client.ApiClient, fence: LeaseFence | None) -> None:
    """Make kopf log in with `api`'s credentials through a session checked by `fence`."""

    @kopf.on.login()
    async def login(**_: Any) -> kopf.AiohttpSession:
        # Called again after a 401: credentials (a projected token) are read afresh.
        info = connection_info(api)
        return kopf.AiohttpSession(server=info.server, aiohttp_session=fenced_session(info, fence))
