"""ZmachineNetworks from the controller's side: which node may serve a Zmachine's private
interface, the /24 each node gets (written to the network's status before anything is
deployed there) and what the agent is told about the network."""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from controller.agent.network import addressing
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.api.zmachine import ZmachineSpec
from controller.api.zmachinenetwork import NODE_PREFIX, ZmachineNetworkSpec
from controller.operator.errors import (
    ControllerError,
    NetworkFull,
    NetworkMisfit,
    NetworkUnavailable,
)
from controller.operator.inventory import NodeView
from controller.operator.kubeapi import Conflict, Kube

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

WRITE_ATTEMPTS = 5
FIRST_PORT = 51820  # WireGuard's usual port, then upwards per network on a node


@dataclass(frozen=True)
class Network:
    """One ZmachineNetwork as read from the API server."""

    namespace: str
    name: str
    uid: str
    resource_version: str
    ip_range: addressing.V4Net
    ipv6_prefix: addressing.V6Net
    nat: bool
    subnets: Mapping[str, addressing.V4Net]  # node -> its /24
    ports: Mapping[str, int]  # node -> UDP port of its overlay end

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> Network:
        meta = obj["metadata"]
        spec = ZmachineNetworkSpec.model_validate(obj["spec"])
        status = obj.get("status") or {}
        prefix = (
            spec.ipv6_prefix
            or status.get("ipv6Prefix")
            or str(addressing.derived_ipv6_prefix(str(meta["uid"])))
        )
        return cls(
            namespace=str(meta["namespace"]),
            name=str(meta["name"]),
            uid=str(meta["uid"]),
            resource_version=str(meta.get("resourceVersion") or ""),
            ip_range=ipaddress.IPv4Network(spec.ip_range),
            ipv6_prefix=ipaddress.IPv6Network(prefix),
            nat=spec.nat,
            subnets={
                str(s["node"]): ipaddress.IPv4Network(s["subnet"])
                for s in status.get("subnets") or []
            },
            ports={str(s["node"]): int(s["listenPort"]) for s in status.get("subnets") or []},
        )

    def __str__(self) -> str:
        return f"ZmachineNetwork {self.namespace}/{self.name}"

    def owner(self, subnet: addressing.V4Net) -> str | None:
        return next((n for n, s in self.subnets.items() if s == subnet), None)

    def free_subnet(self, want: addressing.V4Net | None) -> addressing.V4Net | None:
        """`want` when it is still free, else the first /24 nobody holds."""
        if want is not None:
            return want if self.owner(want) is None else None
        taken = set(self.subnets.values())
        return next(
            (s for s in self.ip_range.subnets(new_prefix=NODE_PREFIX) if s not in taken), None
        )

    def status_subnets(self) -> list[dict[str, Any]]:
        return [
            {
                "node": node,
                "subnet": str(subnet),
                "ipv6Subnet": str(addressing.ipv6_subnet(self.ipv6_prefix, subnet)),
                "listenPort": self.ports[node],
            }
            for node, subnet in sorted(self.subnets.items())
        ]


@dataclass(frozen=True)
class Attachment:
    """A Zmachine's private interface: its network and the address it asks for."""

    network: Network
    ip: ipaddress.IPv4Address | None

    @property
    def wanted_subnet(self) -> addressing.V4Net | None:
        if self.ip is None:
            return None
        return ipaddress.IPv4Network(f"{self.ip}/{NODE_PREFIX}", strict=False)

    def misfit(self, node: NodeView) -> str | None:
        """Why the node cannot serve this interface (placement skips it), or None."""
        if not node.wireguard_key:
            return "has no overlay for private networks (wireguard-go or underlay address)"
        held = self.network.subnets.get(node.name)
        want = self.wanted_subnet
        if held is not None:
            if want is not None and want != held:
                return f"serves {held} of network {self.network.name}, not {self.ip}"
            return None
        if self.network.free_subnet(want) is None:
            if want is not None:
                owner = self.network.owner(want)
                return f"cannot take {want} of network {self.network.name} (node {owner} has it)"
            return f"network {self.network.name} has no free /{NODE_PREFIX} left"
        return None


async def attachment(kube: Kube, namespace: str, spec: ZmachineSpec) -> Attachment | None:
    """The Zmachine's private interface with its network, or None without one.

    Raises NetworkUnavailable when the network is missing or being deleted, NetworkMisfit
    when the asked ip is outside its range."""
    interfaces = spec.network.interfaces if spec.network else []
    if not interfaces:
        return None
    nic = interfaces[0]
    where = "spec.network.interfaces[0]"
    found = await kube.network(namespace, nic.network)
    if found is None:
        raise NetworkUnavailable(
            f"{where}.network: ZmachineNetwork {namespace}/{nic.network} does not exist"
        )
    if found["metadata"].get("deletionTimestamp"):
        raise NetworkUnavailable(
            f"{where}.network: ZmachineNetwork {namespace}/{nic.network} is being deleted"
        )
    network = Network.of(found)
    ip = ipaddress.IPv4Address(nic.ip) if nic.ip else None
    if ip is not None and ip not in network.ip_range:
        raise NetworkMisfit(f"{where}.ip {ip} is outside the range {network.ip_range} of {network}")
    return Attachment(network, ip)


async def ensure_subnet(kube: Kube, att: Attachment, node: str) -> Network:
    """The network with a /24 for `node`, assigned now (status, with its resourceVersion)
    if the node had none. Raises NetworkMisfit or NetworkFull when the node cannot get one
    that holds the asked ip."""
    network = att.network
    for _ in range(WRITE_ATTEMPTS):
        view = NodeView(node, "", 0, 0, wireguard_key="checked by placement")
        why = Attachment(network, att.ip).misfit(view)
        if why is not None:
            cls = NetworkFull if att.ip is None else NetworkMisfit
            raise cls(f"node {node} {why}")
        if node in network.subnets:
            return network
        subnet = network.free_subnet(Attachment(network, att.ip).wanted_subnet)
        assert subnet is not None  # misfit said there is one
        port = await _free_port(kube, node)
        grown = dataclasses.replace(
            network,
            subnets={**network.subnets, node: subnet},
            ports={**network.ports, node: port},
        )
        try:
            await kube.patch_network_status(
                network.namespace,
                network.name,
                network.resource_version,
                {"ipv6Prefix": str(network.ipv6_prefix), "subnets": grown.status_subnets()},
            )
        except Conflict:
            found = await kube.network(network.namespace, network.name)
            if found is None:
                raise NetworkUnavailable(f"{network} was deleted meanwhile") from None
            network = Network.of(found)
            continue
        log.info(
            "subnet assigned", namespace=network.namespace, network=network.name, node=node,
            subnet=str(subnet),
        )  # fmt: skip
        return grown
    raise Conflict(f"{network}: the status kept changing while a subnet was assigned")


async def _free_port(kube: Kube, node: str) -> int:
    """The lowest overlay port no network of any namespace uses on `node` (the controller
    is the only writer, and assigns under its placement lock)."""
    used = {
        int(s["listenPort"])
        for item in await kube.list_networks()
        for s in (item.get("status") or {}).get("subnets") or []
        if s.get("node") == node
    }
    return next(p for p in range(FIRST_PORT, 65536) if p not in used)


def agent_interface(network: Network, node: str, ip: str | None) -> pb.NetworkInterface:
    """What the node needs to plumb the interface (the subnet is the node's own /24)."""
    subnet = network.subnets[node]
    return pb.NetworkInterface(
        network=network.name,
        ip=ip or "",
        network_id=network.uid,
        ip_range=str(network.ip_range),
        subnet=str(subnet),
        ipv6_subnet=str(addressing.ipv6_subnet(network.ipv6_prefix, subnet)),
        nat=network.nat,
        listen_port=network.ports[node],
    )


def peers_of(network: Network, node: str, nodes: Mapping[str, NodeView]) -> list[pb.WireguardPeer]:
    """The other nodes of the network as `node`'s overlay peers: each one's /24, /64 and
    overlay address (100.64.<o2>.<o3>, as zos numbers its WireGuard ends). Nodes not
    registered, or without an overlay, are left out until they are."""
    peers = []
    for other, subnet in sorted(network.subnets.items()):
        view = nodes.get(other)
        if other == node or view is None or not view.wireguard_key or not view.underlay:
            continue
        o = subnet.network_address.packed
        host = f"[{view.underlay}]" if ":" in view.underlay else view.underlay
        peers.append(
            pb.WireguardPeer(
                public_key=view.wireguard_key,
                endpoint=f"{host}:{network.ports[other]}",
                allowed_ips=[
                    str(subnet),
                    str(addressing.ipv6_subnet(network.ipv6_prefix, subnet)),
                    f"100.64.{o[1]}.{o[2]}/32",
                ],
            )
        )
    return peers


@dataclass
class PeerPushes:
    """What each node last said it holds of each network: a pass over a network sends a
    node only what changed, or what it did not have yet, or, as a safety net, what it
    acknowledged more than REFRESH_SECONDS ago (a node that lost its state learns again)."""

    REFRESH_SECONDS = 60.0
    acked: dict[tuple[str, str], tuple[bytes, float]] = field(default_factory=dict)

    def due(self, key: tuple[str, str], digest: bytes) -> bool:
        held = self.acked.get(key)
        return held is None or held[0] != digest or time.monotonic() >= held[1]

    def ack(self, key: tuple[str, str], digest: bytes) -> None:
        refresh = self.REFRESH_SECONDS * random.uniform(0.8, 1.2)  # not all at once
        self.acked[key] = (digest, time.monotonic() + refresh)

    def forget(self, network_uid: str = "", node: str = "") -> None:
        """A network or a node that is gone."""
        for key in [k for k in self.acked if network_uid in ("", k[0]) and node in ("", k[1])]:
            del self.acked[key]


async def push_peers(
    network: Network, nodes: Mapping[str, NodeView], agents: Any, pushes: PeerPushes
) -> None:
    """Tell every node of the network who its peers are, and its options as they stand,
    unless it already acknowledged exactly that (a node with no machine of the network yet
    ignores it and is told again next time)."""
    for node in sorted(network.subnets):
        view = nodes.get(node)
        if view is None or not view.ready:
            continue
        peers, nic = peers_of(network, node, nodes), agent_interface(network, node, None)
        digest = b"".join(m.SerializeToString(deterministic=True) for m in (nic, *peers))
        if not pushes.due((network.uid, node), digest):
            continue
        try:
            answer = await agents.client(view.address).apply_network(network.uid, peers, nic)
            if answer.present:
                pushes.ack((network.uid, node), digest)
        except ControllerError as exc:
            log.warning(
                "peers not pushed", namespace=network.namespace, network=network.name,
                node=node, error=str(exc),
            )  # fmt: skip


def uses(zmachine: Mapping[str, Any], network: str) -> bool:
    """The Zmachine's private or mycelium interface is on `network`."""
    spec_network = (zmachine.get("spec") or {}).get("network") or {}
    names = {i.get("network") for i in spec_network.get("interfaces") or []}
    names.add((spec_network.get("mycelium") or {}).get("network"))
    return network in names


def cached_users(bodies: Iterable[Mapping[str, Any]], namespace: str, network: str) -> list[str]:
    """`users` from the controller's cache of Zmachines: for the status it keeps, with no
    LIST of the namespace every few seconds (deletion asks the API server)."""
    return sorted(
        str(z["metadata"]["name"])
        for z in bodies
        if z["metadata"].get("namespace") == namespace and uses(z, network)
    )


async def users(kube: Kube, namespace: str, network: str) -> list[str]:
    """Names of the Zmachines (deleting ones included: their nodes still hold the network)."""
    items = await kube.list_zmachines(namespace)
    return sorted(str(z["metadata"]["name"]) for z in items if uses(z, network))
