"""Public addresses from ZmachinePublicIPPools: who may get one, taking one under the
placement lock (recorded in the pool's status, written with its resourceVersion), and
giving it back when the Zmachine goes.

A Zmachine takes one address of each family its pool has, as a zos ``ip`` workload gives
its machine. Pools are tried in name order; an address has at most one holder.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.api.zmachinepublicippool import KIND, ZmachinePublicIPPoolSpec
from controller.operator.errors import PublicIPExhausted
from controller.operator.inventory import NodeView
from controller.operator.kubeapi import Conflict, Gone, Kube

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

WRITE_ATTEMPTS = 5
FIELD = "spec.network.publicIP"


@dataclass(frozen=True)
class Family:
    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network
    gateway: str
    addresses: tuple[str, ...]

    def cidr(self, address: str) -> str:
        return f"{address}/{self.subnet.prefixlen}"


@dataclass(frozen=True)
class Held:
    """The public addresses a Zmachine holds (CIDRs), with their gateways."""

    pool: str
    ipv4: str = ""
    gateway4: str = ""
    ipv6: str = ""
    gateway6: str = ""

    def to_pb(self) -> pb.PublicInterface:
        return pb.PublicInterface(
            ipv4=self.ipv4, gateway4=self.gateway4, ipv6=self.ipv6, gateway6=self.gateway6
        )


@dataclass(frozen=True)
class Pool:
    name: str
    resource_version: str
    ipv4: Family | None
    ipv6: Family | None
    allocations: tuple[dict[str, Any], ...]

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> Pool:
        spec = ZmachinePublicIPPoolSpec.model_validate(obj["spec"])
        families = {}
        for key in ("ipv4", "ipv6"):
            given = getattr(spec, key)
            families[key] = (
                None
                if given is None
                else Family(
                    ipaddress.ip_network(given.subnet, strict=False),
                    given.gateway,
                    tuple(given.addresses),
                )
            )
        return cls(
            name=str(obj["metadata"]["name"]),
            resource_version=str(obj["metadata"].get("resourceVersion") or ""),
            allocations=tuple((obj.get("status") or {}).get("allocations") or []),
            **families,
        )

    def __str__(self) -> str:
        return f"{KIND} {self.name}"

    def _free(self, key: str) -> list[str]:
        family: Family | None = getattr(self, key)
        if family is None:
            return []
        taken = {str(a.get(key) or "").split("/")[0] for a in self.allocations}
        return [a for a in family.addresses if a not in taken]

    def free(self) -> int:
        """Zmachines the pool can still serve: each takes one address of every family."""
        counts = [len(self._free(k)) for k in ("ipv4", "ipv6") if getattr(self, k) is not None]
        return min(counts) if counts else 0

    def held_by(self, uid: str) -> Held | None:
        entry = next((a for a in self.allocations if a.get("uid") == uid), None)
        if entry is None:
            return None
        v4, v6 = entry.get("ipv4") or "", entry.get("ipv6") or ""
        return Held(
            self.name,
            v4,
            self.ipv4.gateway if v4 and self.ipv4 else "",
            v6,
            self.ipv6.gateway if v6 and self.ipv6 else "",
        )

    def entry_for(self, uid: str, zmachine: str) -> dict[str, Any]:
        """A new allocation: the lowest free address of each family (free() > 0)."""
        entry: dict[str, Any] = {"uid": uid, "zmachine": zmachine}
        for key in ("ipv4", "ipv6"):
            family: Family | None = getattr(self, key)
            if family is not None:
                entry[key] = family.cidr(self._free(key)[0])
        return entry

    def status(self, allocations: list[dict[str, Any]]) -> dict[str, Any]:
        after = Pool(self.name, "", self.ipv4, self.ipv6, tuple(allocations))
        return {"allocations": allocations, "free": after.free()}


def misfit(node: NodeView) -> str | None:
    """Why the node cannot give a Zmachine a public NIC."""
    return None if node.public_interface else "has no public interface"


async def _pools(kube: Kube) -> list[Pool]:
    return sorted((Pool.of(p) for p in await kube.list_pools()), key=lambda p: p.name)


async def held(kube: Kube, uid: str) -> Held | None:
    return next((h for p in await _pools(kube) if (h := p.held_by(uid)) is not None), None)


async def left(kube: Kube) -> str | None:
    """Why no Zmachine can get a public address now (placement waits), or None."""
    pools = await _pools(kube)
    if any(p.free() for p in pools):
        return None
    return _exhausted(pools)


def _exhausted(pools: list[Pool]) -> str:
    if not pools:
        return f"{FIELD}: no {KIND} exists"
    counts = ", ".join(f"{p.name} ({len(p.allocations)} held)" for p in pools)
    return f"{FIELD}: no free public address left in any {KIND}: {counts}"


async def allocate(kube: Kube, uid: str, zmachine: str) -> Held:
    """The addresses the Zmachine holds, taken now if it holds none. Call under the
    placement lock (the controller is the only writer; the resourceVersion guards the
    rest). Raises PublicIPExhausted when every pool is full."""
    for _ in range(WRITE_ATTEMPTS):
        pools = await _pools(kube)
        for pool in pools:
            if (h := pool.held_by(uid)) is not None:
                return h
        free = next((p for p in pools if p.free()), None)
        if free is None:
            raise PublicIPExhausted(f"zmachine {zmachine}: {_exhausted(pools)}")
        pool = free
        entry = pool.entry_for(uid, zmachine)
        allocations = [*pool.allocations, entry]
        try:
            await kube.patch_pool_status(pool.name, pool.resource_version, pool.status(allocations))
        except (Conflict, Gone):
            continue
        log.info(
            "public address allocated", zmachine=zmachine, uid=uid, pool=pool.name,
            ipv4=entry.get("ipv4"), ipv6=entry.get("ipv6"),
        )  # fmt: skip
        grown = Pool(pool.name, "", pool.ipv4, pool.ipv6, tuple(allocations))
        found = grown.held_by(uid)
        assert found is not None
        return found
    raise Conflict(f"zmachine {zmachine}: the pools kept changing while an address was taken")


async def release(kube: Kube, uid: str) -> None:
    """Give back whatever the Zmachine holds (idempotent)."""
    for _ in range(WRITE_ATTEMPTS):
        holding = [p for p in await _pools(kube) if p.held_by(uid) is not None]
        if not holding:
            return
        try:
            for pool in holding:
                rest = [a for a in pool.allocations if a.get("uid") != uid]
                await kube.patch_pool_status(pool.name, pool.resource_version, pool.status(rest))
                log.info("public address released", uid=uid, pool=pool.name)
        except (Conflict, Gone):
            continue
        return
    raise Conflict(f"zmachine uid {uid}: the pools kept changing while its address was released")
