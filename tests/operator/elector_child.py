"""Leadership code in a process of its own, for tests of how it ends its process.

`leader`: takes the Lease, starts renewing, then sends the elector's requests to a closed
port (as when the API server becomes unreachable), prints `leading` and waits to be ended.

`fenced`: holds a fence renewed just now, waits past its deadline, then sends one request
to `--url` through kopf's session (`aiohttp`) or our kubernetes client (`kubernetes`); the
fence must end the process before anything reaches that address.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import kopf
from kubernetes import client

from controller.kube import api_client
from controller.logs import configure_logging
from controller.operator.apisession import fence_api_client, fenced_session
from controller.operator.leader import LeaderElector, LeaseFence, LeaseTiming


def lead_then_lose_the_api_server(args: argparse.Namespace) -> None:
    elector = LeaderElector(api_client(args.kubeconfig), args.namespace, LeaseTiming(*args.timing))
    elector.acquire()
    elector.keep()
    elector.coordination.api_client.configuration.host = args.unreachable
    print("leading", flush=True)
    while True:
        time.sleep(1)


def request_after_the_deadline(args: argparse.Namespace) -> None:
    fence = LeaseFence(renew_deadline=0.5)
    fence.renewed(time.monotonic())
    time.sleep(1.0)  # as a process frozen past its deadline
    if args.via == "aiohttp":

        async def get() -> None:
            info = kopf.ConnectionInfo(server=args.url, insecure=True)
            async with fenced_session(info, fence) as session:
                await session.get(f"{args.url}/api")

        asyncio.run(get())
    else:
        config = client.Configuration()
        config.host, config.verify_ssl = args.url, False
        api = client.ApiClient(config)
        fence_api_client(api, fence)
        client.CoreV1Api(api).get_api_resources(_request_timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    leader = sub.add_parser("leader")
    leader.add_argument("--kubeconfig", required=True)
    leader.add_argument("--namespace", required=True)
    leader.add_argument("--unreachable", required=True, help="URL where nothing listens")
    leader.add_argument("--timing", type=float, nargs=3, required=True)
    fenced = sub.add_parser("fenced")
    fenced.add_argument("--url", required=True)
    fenced.add_argument("--via", choices=["aiohttp", "kubernetes"], required=True)
    args = parser.parse_args()
    configure_logging("INFO")
    if args.mode == "leader":
        lead_then_lose_the_api_server(args)
    else:
        request_after_the_deadline(args)


if __name__ == "__main__":
    main()
