"""``zmachine-agent``: ``serve`` runs the node agent, ``certs DIR`` writes a dev PKI,
``cleanup`` (with the flags of ``serve``, no agent running) tears down every machine."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from controller.agent.config import AgentConfig, parse_config
from controller.agent.errors import AgentError
from controller.agent.guest.provision import Provisioner
from controller.agent.registration import Registrar, Registration
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2_grpc as pb_grpc
from controller.agent.rpc.service import AgentService
from controller.agent.rpc.tls import server_credentials, write_dev_pki
from controller.agent.runtime.cleanup import cleanup
from controller.agent.runtime.events import EventBus
from controller.agent.runtime.machines import Machines
from controller.agent.runtime.metrics import MachineCollector
from controller.agent.runtime.state import StateStore
from controller.agent.runtime.supervisor import Supervisor
from controller.logs import configure_logging

log = structlog.get_logger(__name__)
SERVICE_NAME = "zmachine.agent.v1.AgentService"


async def serve(config: AgentConfig) -> None:
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    bus = EventBus()
    provisioner = Provisioner(config)
    # May boot a KVM probe guest once (seconds): do it now, off the event loop.
    hv = await asyncio.to_thread(provisioner.hypervisor_info)
    machines = Machines(
        StateStore(config.machines_dir), provisioner, bus, memory=config.memory_capacity
    )
    await machines.adopt_all()

    server = grpc.aio.server()
    service = AgentService(machines, bus, config.node_name)
    pb_grpc.add_AgentServiceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.tls is None:
        port = server.add_insecure_port(config.listen)
        log.warning("serving plaintext gRPC (--insecure-dev)", listen=config.listen)
    else:
        port = server.add_secure_port(config.listen, server_credentials(config.tls))
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    if config.metrics_port:
        registry = CollectorRegistry()
        registry.register(MachineCollector(machines, asyncio.get_running_loop()))
        host = config.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
        start_http_server(config.metrics_port, addr=host, registry=registry)

    tasks = [asyncio.create_task(Supervisor(machines, config.supervision).run())]
    if config.register:
        registration = Registration(
            config.node_name, config.advertise_address, config.lease_namespace, config.kubeconfig
        )
        tasks.append(asyncio.create_task(Registrar(registration, service.node_info).run()))
    log.info(
        "agent ready",
        listen=config.listen,
        port=port,
        state_dir=str(config.state_dir),
        machines=len(machines.records),
        hypervisor=hv.name,
        hypervisor_version=hv.version,
        accelerated=hv.accelerated,
        metrics_port=config.metrics_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # VMs keep running: they live in their own sessions and are adopted on the next start.
    log.info("agent stopping; VMs keep running")
    for task in tasks:
        task.cancel()
    await server.stop(grace=2)


def _certs(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(
        prog="zmachine-agent certs",
        description="Write a dev CA plus server and client certificates (not for production).",
    )
    p.add_argument("dir", type=Path)
    p.add_argument(
        "--server-name",
        action="append",
        default=None,
        help="DNS name or IP of the agent (repeatable; default localhost, 127.0.0.1)",
    )
    a = p.parse_args(argv)
    write_dev_pki(a.dir, a.server_name or ("localhost", "127.0.0.1"))
    print(a.dir)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
    command = args.pop(0) if args and args[0] in ("serve", "certs", "cleanup") else "serve"
    try:
        if command == "certs":
            _certs(args)
        elif command == "cleanup":
            removed = asyncio.run(cleanup(parse_config(args)))
            log.info("cleanup done", machines=removed)
        else:
            asyncio.run(serve(parse_config(args)))
    except AgentError as exc:
        log.error("agent failed", error=str(exc))
        sys.exit(2)


if __name__ == "__main__":
    main()
