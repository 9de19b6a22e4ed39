"""Conversion between the wire messages (zmachine.agent.v1) and the agent's own model."""

from __future__ import annotations

import base64
import binascii
import ipaddress

from google.protobuf.timestamp_pb2 import Timestamp

from controller.agent.errors import InvalidSpec
from controller.agent.network import wireguard
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.runtime.events import Event, EventType
from controller.agent.runtime.state import MachineRecord, State
from controller.agent.spec import (
    Interface,
    MachineSpec,
    Mount,
    PublicInterface,
    Ref,
    RestartPolicy,
    Volume,
    VolumeKind,
    env_digest,
)

_POLICY = {
    pb.RESTART_POLICY_UNSPECIFIED: RestartPolicy.ALWAYS,
    pb.RESTART_POLICY_ALWAYS: RestartPolicy.ALWAYS,
    pb.RESTART_POLICY_ON_FAILURE: RestartPolicy.ON_FAILURE,
    pb.RESTART_POLICY_NEVER: RestartPolicy.NEVER,
}
_KIND = {pb.VOLUME_KIND_DISK: VolumeKind.DISK, pb.VOLUME_KIND_SHARE: VolumeKind.SHARE}
_STATE = {
    State.PROVISIONING: pb.MACHINE_STATE_PROVISIONING,
    State.RUNNING: pb.MACHINE_STATE_RUNNING,
    State.PAUSED: pb.MACHINE_STATE_PAUSED,
    State.RESTARTING: pb.MACHINE_STATE_RESTARTING,
    State.SUCCEEDED: pb.MACHINE_STATE_SUCCEEDED,
    State.FAILED: pb.MACHINE_STATE_FAILED,
}
_BOOT = {"container": pb.BOOT_MODE_CONTAINER, "vm": pb.BOOT_MODE_VM, "image": pb.BOOT_MODE_IMAGE}
_EVENT = {t: getattr(pb, f"EVENT_TYPE_{t.name}") for t in EventType}


class UnknownVolumeKind(ValueError):
    pass


def state_to_pb(state: State) -> pb.MachineState.ValueType:
    return _STATE[state]


def ref_from_pb(ref: pb.ZmachineRef) -> Ref:
    return Ref(namespace=ref.namespace, name=ref.name, uid=ref.uid)


def ref_to_pb(ref: Ref) -> pb.ZmachineRef:
    return pb.ZmachineRef(namespace=ref.namespace, name=ref.name, uid=ref.uid)


def spec_from_pb(spec: pb.ZmachineSpec) -> MachineSpec:
    """Raises UnknownVolumeKind for a volume without a kind (the caller names the field)."""
    volumes = []
    for i, v in enumerate(spec.volumes):
        if v.kind not in _KIND:
            raise UnknownVolumeKind(f"spec.volumes[{i}].kind must be DISK or SHARE")
        volumes.append(Volume(v.name, _KIND[v.kind], v.size_bytes))
    return MachineSpec(
        flist=spec.flist,
        cpu=spec.cpu,
        memory_bytes=spec.memory_bytes,
        size_bytes=spec.size_bytes,
        entrypoint=spec.entrypoint,
        env=dict(sorted(spec.env.items())),
        volumes=tuple(volumes),
        mounts=tuple(Mount(m.name, m.mountpoint) for m in spec.mounts),
        interfaces=tuple(interface_from_pb(n) for n in spec.interfaces),
        restart_policy=_POLICY.get(spec.restart_policy, RestartPolicy.ALWAYS),
        paused=spec.paused,
        hostname=spec.hostname,
        ssh_keys=tuple(spec.ssh_keys),
        public=public_from_pb(spec.public) if spec.HasField("public") else None,
        planetary=spec.planetary,
        mycelium_seed=spec.mycelium_seed,
    )


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def machine_to_pb(rec: MachineRecord) -> pb.Machine:
    alive = rec.vmm is not None and rec.vmm.alive()
    return pb.Machine(
        ref=ref_to_pb(rec.ref),
        generation=rec.generation,
        state=_STATE[rec.state],
        reason=rec.reason,
        message=rec.message,
        boot_mode=_BOOT.get(rec.boot_mode, pb.BOOT_MODE_UNSPECIFIED),
        interfaces=[
            pb.InterfaceStatus(network=n.network, ip=n.ip, mac=n.mac, tap=n.tap, ipv6=n.ipv6)
            for n in rec.nics
        ],
        restarts=rec.restarts,
        pid=rec.vmm.pid if alive and rec.vmm else 0,
        hypervisor=rec.hypervisor,
        started_at=_timestamp(rec.started_at) if rec.started_at else None,
        boot_duration_seconds=rec.boot_duration,
        log_tail=rec.log_tail,
        exit_code=rec.exit_code,
        exit_reason=rec.exit_reason,
        env_hash=env_digest(rec.spec.env),
    )


def event_to_pb(event: Event) -> pb.Event:
    return pb.Event(
        type=_EVENT[event.type],
        ref=ref_to_pb(event.ref),
        generation=event.generation,
        state=_STATE[event.state],
        reason=event.reason,
        message=event.message,
        time=_timestamp(event.time),
    )


def public_from_pb(p: pb.PublicInterface) -> PublicInterface:
    return PublicInterface(p.ipv4, p.gateway4, p.ipv6, p.gateway6)


def interface_from_pb(n: pb.NetworkInterface) -> Interface:
    return Interface(
        n.network, n.ip, n.network_id, n.ip_range, n.subnet, n.ipv6_subnet, n.nat, n.listen_port
    )


def peer_from_pb(network_id: str, peer: pb.WireguardPeer) -> wireguard.Peer:
    """A peer of a network's overlay, checked: it ends up in a configuration protocol."""
    where = f"network {network_id}: peer {peer.endpoint!r}"
    try:
        if len(base64.b64decode(peer.public_key, validate=True)) != 32:
            raise ValueError("the public key is not 32 bytes")
        host, port = peer.endpoint.rsplit(":", 1)
        ipaddress.ip_address(host.strip("[]"))
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"port {port} is out of range")
        allowed = tuple(str(ipaddress.ip_network(a)) for a in peer.allowed_ips)
    except (ValueError, binascii.Error) as exc:
        raise InvalidSpec(f"{where}: {exc}") from exc
    return wireguard.Peer(peer.public_key, peer.endpoint, allowed)
