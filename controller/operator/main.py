"""zmachine-controller: the kopf operator that reconciles Zmachines."""

from __future__ import annotations

import argparse
import sys

import kopf

from controller.logs import configure_logging
from controller.operator import handlers, metrics


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
    args = parser.parse_args(argv)

    configure_logging(args.log_level, json=args.log_format == "json")
    metrics.serve(args.metrics_port)
    assert handlers.FINALIZER  # the import registers the handlers with kopf
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
