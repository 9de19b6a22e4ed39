"""Who runs `converge`, when, and who writes the status it computes.

A Zmachine is reconciled when something tells us it may have changed, never on a short
timer: its spec changed (watch), its machine changed on the node (the agent's event stream),
room appeared for it while it was Pending (a node joined or grew, a placement went away), or
a timer it asked for itself (a retry). A slow safety net reconciles each Zmachine once per
`resync_period`, at a time drawn at random for it, so that a restart or a large apply never
makes the whole fleet due at once.

The worker is the only writer of a Zmachine's status outside deletion, and it writes only
what changed, with the object it gets back as its new view.
"""

from __future__ import annotations

import asyncio
import fnmatch
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import kopf
import pydantic
import structlog

from controller.api import conditions as cond
from controller.api.zmachine import GROUP, Phase
from controller.operator import metrics, publicips
from controller.operator.errors import ControllerError
from controller.operator.kubeapi import ApiUnavailable, Conflict, Gone
from controller.operator.reconcile import Runtime, Target, converge, placement_of, release
from controller.operator.status import StatusWriter

log: structlog.stdlib.BoundLogger = structlog.get_logger(__name__)

FINALIZER = f"{GROUP}/finalizer"
SYNC_WAIT_SECONDS = 10.0  # at start, how long to wait for the agents' streams to sync
RETRY_SECONDS = 10.0  # after an API error
DELETE_RETRY_SECONDS = 5.0  # a deletion the node has not confirmed yet
_META = ("namespace", "name", "uid", "generation", "creationTimestamp", "resourceVersion",
         "deletionTimestamp", "finalizers", "annotations")  # fmt: skip


def _newer(found: Mapping[str, Any], held: Mapping[str, Any]) -> bool:
    """Is `found` at least as new as `held`? resourceVersions are etcd revisions in
    practice; anything else is taken as newer."""
    a, b = str(found.get("resourceVersion") or ""), str(held.get("resourceVersion") or "")
    return not (a.isdigit() and b.isdigit()) or int(a) >= int(b)


SECRET_RESYNC_SECONDS = 30.0


@dataclass
class Worker:
    rt: Runtime
    namespaces: Sequence[str] = ()  # globs; empty: all
    resync_period: float = 300.0
    # Reconciles in flight: they mostly wait (on agents, on the API server), e.g. a Delete
    # waits seconds for a guest to power off; API calls are bounded by the thread pool.
    concurrency: int = 64
    # uid -> the latest object seen (metadata subset, spec, status).
    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)
    due: dict[str, float] = field(default_factory=dict)  # uid -> monotonic time of resync
    queue: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    queued: set[str] = field(default_factory=set)
    active: set[str] = field(default_factory=set)
    again: set[str] = field(default_factory=set)  # kicked while being reconciled
    synced: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.rt.kick = self.kick
        self.rt.seen = self.observe
        self.rt.inventory.on_capacity = self.kick_pending

    # ------------------------------------------------------------------ inputs

    def _ours(self, namespace: str) -> bool:
        return not self.namespaces or any(fnmatch.fnmatch(namespace, g) for g in self.namespaces)

    def observe(self, body: Mapping[str, Any]) -> None:
        """A Zmachine as the watch (or our own write) delivered it."""
        meta = body.get("metadata") or {}
        uid = str(meta.get("uid"))
        if not self._ours(str(meta.get("namespace"))):
            return
        held = self.bodies.get(uid)
        if held is not None and not _newer(meta, held["metadata"]):
            return  # a watch event older than what our own write returned
        kept = {k: meta[k] for k in _META if k in meta}
        # Only ours: kubectl's last-applied copy of the object would double what we hold.
        kept["annotations"] = {
            k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith(GROUP)
        }
        self.bodies[uid] = {
            "metadata": kept,
            "spec": dict(body.get("spec") or {}),
            "status": dict(body.get("status") or {}),
        }
        if held is None:
            self.due[uid] = time.monotonic() + self._period(uid) * random.uniform(0.5, 1.5)
            self.kick(uid, "change")
        elif any(
            held["metadata"].get(k) != meta.get(k) for k in ("generation", "deletionTimestamp")
        ):
            self.kick(uid, "change")

    def forget(self, uid: str) -> None:
        self.bodies.pop(uid, None)
        self.due.pop(uid, None)
        self.again.discard(uid)

    def kick(self, uid: str, cause: str) -> None:
        if uid not in self.bodies:
            return
        metrics.KICKS.labels(cause=cause).inc()
        if uid in self.active:
            self.again.add(uid)
        elif uid not in self.queued:
            self.queued.add(uid)
            self.queue.put_nowait(uid)

    def kick_pending(self) -> None:
        for uid in list(self.rt.pending):
            self.kick(uid, "capacity")

    # ------------------------------------------------------------------ running

    async def start(self) -> None:
        """Fill the caches from the API server (nodes, then placements and objects) before
        anything is judged; then wait a little for the agents' streams."""
        inventory = self.rt.inventory
        delay = 1.0
        while True:
            # Until they succeed: a controller started while the API server is away (or
            # still answering 429 while its storage initializes) must serve once it is back.
            try:
                nodes = await self.rt.kube.list_nodes()
                items = await self.rt.kube.list_zmachines()
                break
            except ApiUnavailable as exc:
                log.warning("initial lists failed; retrying", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        for node in nodes:
            meta = node.get("metadata") or {}
            inventory.observe_node(
                str(meta.get("name")), meta, node.get("spec") or {}, node.get("status") or {}
            )
        for item in items:
            placement = placement_of(item)
            if placement is not None:
                inventory.placements.setdefault(str(item["metadata"]["uid"]), placement)
            self.observe(item)
        self.rt.placements_seeded = True
        deadline = time.monotonic() + SYNC_WAIT_SECONDS
        # Polls an in-memory set for a few seconds at most, once per start.
        while time.monotonic() < deadline and any(  # noqa: ASYNC110
            n.ready and n.name not in self.rt.machines.synced for n in inventory.nodes.values()
        ):
            await asyncio.sleep(0.1)
        self.synced.set()
        log.info("caches synced", nodes=len(inventory.nodes), zmachines=len(self.bodies))

    async def run(self) -> None:
        await self.start()
        workers = [
            asyncio.create_task(self._work(), name=f"reconcile worker {i}")
            for i in range(self.concurrency)
        ]
        try:
            await self._resync()
        finally:
            for task in workers:
                task.cancel()

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for uid in [u for u, t in self.due.items() if t <= now]:
                self.due[uid] = now + self._period(uid) * random.uniform(0.75, 1.25)
                self.kick(uid, "resync")

    def _period(self, uid: str) -> float:
        """Secrets are not watched (that would take list/watch on every Secret): a Zmachine
        whose env reads one is looked at every SECRET_RESYNC_SECONDS, so a changed value
        rolls out within about that long. Each look reads the Secret, and writes nothing
        unless the value changed."""
        env = ((self.bodies.get(uid) or {}).get("spec") or {}).get("env") or []
        if any(isinstance(v, Mapping) and v.get("valueFrom") for v in env):
            return min(self.resync_period, SECRET_RESYNC_SECONDS)
        return self.resync_period

    async def _work(self) -> None:
        while True:
            uid = await self.queue.get()
            self.queued.discard(uid)
            self.active.add(uid)
            try:
                await self.reconcile(uid)
            except Exception:
                log.exception("reconcile failed", uid=uid)
            finally:
                self.active.discard(uid)
            if uid in self.again:
                self.again.discard(uid)
                self.kick(uid, "again")

    async def reconcile(self, uid: str) -> None:
        body = self.bodies.get(uid)
        if body is None:
            return
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            if FINALIZER in (meta.get("finalizers") or []):
                await self._delete(body)
            return
        started = time.monotonic()
        target = Target.of(meta)
        posted: list[tuple[str, str, str]] = []
        out = self._writer(body, target, posted)
        result = "error"
        if FINALIZER not in (meta.get("finalizers") or []):
            # Before anything is placed or deployed: nothing may outlive the object.
            try:
                await self._set_finalizers(target, [*(meta.get("finalizers") or []), FINALIZER])
            except (Conflict, Gone):
                return  # a newer object: its watch event brings it back here
            except ControllerError as exc:
                log.warning("finalizer not added", uid=uid, error=str(exc))
                self.rt.later(uid, RETRY_SECONDS, "error")
                return
        try:
            await converge(self.rt, target, body["spec"], out)
            result = "ok"
        except pydantic.ValidationError as exc:
            message = f"spec is invalid: {_first_error(exc)}"
            out.condition(cond.READY, False, "InvalidSpec", message)
            out.phase_to(Phase.FAILED, "InvalidSpec", message)
            result = "invalid"
        except ControllerError as exc:
            out.set("message", str(exc))
            self.rt.later(uid, RETRY_SECONDS, "error")
        finally:
            metrics.RECONCILES.labels(result=result).inc()
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
        out.flush()
        status = dict(out.patch.get("status") or {})
        await self._write(target, status, posted)
        # A pass that changed nothing is the quiet common case (a resync, a repeat event).
        level = log.info if status or result != "ok" else log.debug
        level(
            "reconciled", namespace=target.namespace, name=target.name, uid=uid,
            phase=out.phase, result=result, changed=sorted(status),
        )  # fmt: skip

    def _writer(
        self, body: dict[str, Any], target: Target, posted: list[tuple[str, str, str]]
    ) -> StatusWriter:
        return StatusWriter(
            kopf.Body(cast(kopf.RawBody, {**body, **_KIND})),
            body["status"],
            kopf.Patch(),
            target.generation,
            post=lambda *event: posted.append(event),
        )

    async def _set_finalizers(self, target: Target, finalizers: list[str]) -> None:
        """Optimistically, at the object's resourceVersion: a conflict is a newer object,
        whose watch event comes with its own reconciliation."""
        found = await self.rt.kube.set_finalizers(
            target.namespace, target.name, target.resource_version, finalizers
        )
        self.observe(found)
        target.resource_version = str(found["metadata"]["resourceVersion"])

    async def _delete(self, body: dict[str, Any]) -> None:
        """Remove the machine from its node, then the finalizer (see reconcile.release)."""
        meta = body["metadata"]
        target = Target.of(meta)
        posted: list[tuple[str, str, str]] = []
        out = self._writer(body, target, posted)
        try:
            await release(self.rt, target, body["status"], meta, out)
            # Only once the node let go of it: an address in use must not get a second holder.
            await publicips.release(self.rt.kube, target.uid)
        except ControllerError as exc:
            out.set("phase", Phase.TERMINATING.value)
            out.set("message", str(exc))
            log.info(
                "deletion waits", namespace=target.namespace, name=target.name,
                uid=target.uid, error=str(exc),
            )  # fmt: skip
            self.rt.later(target.uid, DELETE_RETRY_SECONDS, "delete")
            await self._write(target, dict(out.patch.get("status") or {}), posted)
            return
        log.info("released", namespace=target.namespace, name=target.name, uid=target.uid)
        kept = [f for f in meta.get("finalizers") or [] if f != FINALIZER]
        try:
            await self._set_finalizers(target, kept)
        except (Conflict, Gone):
            return  # a newer object (its watch event brings it back here), or gone already
        out.event("Deleted", "everything on the node is gone")
        await self._post(target, posted)

    async def _write(
        self, target: Target, status: dict[str, Any], posted: list[tuple[str, str, str]]
    ) -> None:
        if status:
            try:
                found = await self.rt.kube.patch_status(target.namespace, target.name, status)
            except Gone:
                return
            except ControllerError as exc:
                log.warning(
                    "status not written", namespace=target.namespace, name=target.name,
                    uid=target.uid, error=str(exc),
                )  # fmt: skip
                self.rt.later(target.uid, RETRY_SECONDS, "error")
                return
            metrics.STATUS_WRITES.inc()
            if (found.get("metadata") or {}).get("uid") == target.uid:
                self.observe(found)
        await self._post(target, posted)

    async def _post(self, target: Target, posted: list[tuple[str, str, str]]) -> None:
        involved = {**_KIND, "metadata": {
            "namespace": target.namespace, "name": target.name, "uid": target.uid,
        }}  # fmt: skip
        for type_, reason, message in posted:
            await self.rt.kube.event(involved, type_, reason, message)


_KIND = {"apiVersion": "zos.threefold.io/v1alpha1", "kind": "Zmachine"}


def _first_error(exc: pydantic.ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"spec.{where}: {err['msg']}"
