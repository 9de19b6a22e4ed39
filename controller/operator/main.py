"""zmachine-controller: the kopf operator that reconciles Zmachines onto node agents."""

from __future__ import annotations

import argparse
import base64
import logging
import sys
from pathlib import Path
from typing import Any

import kopf
from kubernetes import client

from controller.api.zmachinenode import LEASE_NAMESPACE_DEFAULT
from controller.kube import ApiException, api_client
from controller.logs import configure_logging
from controller.operator import handlers, metrics
from controller.operator.agents import AgentPool
from controller.operator.apisession import fence_api_client, install
from controller.operator.inventory import Inventory
from controller.operator.kubeapi import Kube
from controller.operator.leader import LeaderElector, LeaseTiming, standby_health
from controller.operator.nodes import NodeMonitor
from controller.operator.reconcile import METRICS_INTERVAL, Runtime
from controller.operator.worker import Worker


def _secret_reader(core: client.CoreV1Api) -> Any:
    def read(namespace: str, name: str) -> dict[str, str] | None:
        try:
            secret = core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        data = {k: str(v) for k, v in (secret.data or {}).items()}
        data.update(
            {
                k: base64.b64encode(v.encode()).decode()
                for k, v in (secret.string_data or {}).items()
            }
        )
        return data

    return read


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zmachine-controller", description=__doc__)
    parser.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="watch only these namespaces (glob); default: the whole cluster",
    )
    parser.add_argument("--metrics-port", type=int, default=9090)
    parser.add_argument("--health-port", type=int, default=8080)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=["json", "console"], default="json")
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument(
        "--lease-namespace",
        default=LEASE_NAMESPACE_DEFAULT,
        help="namespace of the leader-election Lease",
    )
    parser.add_argument("--no-leader-election", action="store_true")
    defaults = LeaseTiming()
    parser.add_argument(
        "--leader-elect-lease-duration",
        type=float,
        default=defaults.lease_duration,
        help="seconds a standby waits, by its own clock since the Lease last changed, before "
        "taking it over",
    )
    parser.add_argument(
        "--leader-elect-renew-deadline",
        type=float,
        default=defaults.renew_deadline,
        help="seconds the leader may go without a successful renewal before it exits; "
        "less than the lease duration",
    )
    parser.add_argument(
        "--leader-elect-retry-period",
        type=float,
        default=defaults.retry_period,
        help="seconds between attempts to take or renew the Lease",
    )
    tls = parser.add_mutually_exclusive_group(required=True)
    tls.add_argument(
        "--agent-tls-dir",
        type=Path,
        help="directory with ca.crt, client.crt and client.key for agent mTLS",
    )
    tls.add_argument(
        "--agent-insecure-dev",
        action="store_true",
        help="plaintext gRPC to agents: development on loopback only",
    )
    parser.add_argument(
        "--agent-tls-server-name",
        default=None,
        help="name in the agents' server certificates (default: each agent's address)",
    )
    parser.add_argument(
        "--delete-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for an unreachable node before releasing a deleted Zmachine anyway",
    )
    parser.add_argument(
        "--cpu-allocation-ratio",
        type=float,
        default=10.0,
        help="vCPUs placed per node core (a node's annotation "
        "zos.threefold.io/cpu-allocation-ratio overrides it); memory is never overcommitted",
    )
    parser.add_argument(
        "--node-lost-timeout",
        type=float,
        default=300.0,
        help="seconds a node may be not Ready or deleted before its Zmachines without "
        "spec.nodeName are placed on another node",
    )
    parser.add_argument(
        "--orphan-grace",
        type=float,
        default=60.0,
        help="seconds a VM must look orphaned (no Zmachine placed on its node) before the "
        "controller asks the node to remove it",
    )
    parser.add_argument(
        "--resync-period",
        type=float,
        default=300.0,
        help="seconds between the safety-net reconciliations of each Zmachine (each at a "
        "random time in the period); changes are pushed by agents and the API server",
    )
    parser.add_argument(
        "--status-metrics-interval",
        type=float,
        default=METRICS_INTERVAL,
        help="least seconds between two snapshots of a Zmachine's usage in status.metrics; "
        "0 writes none (the live figures are on the agents' /metrics)",
    )
    args = parser.parse_args(argv)
    try:
        timing = LeaseTiming(
            args.leader_elect_lease_duration,
            args.leader_elect_renew_deadline,
            args.leader_elect_retry_period,
        )
    except ValueError as exc:
        parser.error(str(exc))

    configure_logging(args.log_level, json=args.log_format == "json")
    # kopf reports every handler run at INFO; our own lines already say what happened.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    api = api_client(args.kubeconfig)
    elector = None
    if not args.no_leader_election:
        # A client of its own: the elector works before it leads, so no fence guards it.
        elector = LeaderElector(api_client(args.kubeconfig), args.lease_namespace, timing)
        fence_api_client(api, elector.fence)
        # A standby is alive, only not leading: answer liveness probes while it waits.
        with standby_health(args.health_port):
            elector.acquire()
        elector.keep()
    install(api, None if elector is None else elector.fence)
    metrics.serve(args.metrics_port)
    runtime = Runtime(
        inventory=Inventory(cpu_ratio=args.cpu_allocation_ratio),
        agents=AgentPool(
            None if args.agent_insecure_dev else args.agent_tls_dir, args.agent_tls_server_name
        ),
        read_secret=_secret_reader(client.CoreV1Api(api)),
        kube=Kube(api),
        delete_timeout=args.delete_timeout,
        node_lost_timeout=args.node_lost_timeout,
        metrics_interval=args.status_metrics_interval,
    )
    metrics.NODES.inventory = runtime.inventory
    monitor = NodeMonitor(runtime, namespaces=args.namespace, orphan_grace=args.orphan_grace)
    worker = Worker(runtime, namespaces=args.namespace, resync_period=args.resync_period)
    assert handlers.track_zmachine  # the import registers the handlers with kopf
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz",
        memo=kopf.Memo(runtime=runtime, monitor=monitor, worker=worker),
    )
    if elector is not None:
        elector.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
