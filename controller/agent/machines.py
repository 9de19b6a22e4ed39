"""The agent's machine table: Deploy/Delete/Pause/Resume/Restart with one lock per VM.

Every operation on a VM holds that VM's asyncio.Lock (the supervisor too), so work on
different VMs runs concurrently while two operations on one VM never interleave.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog

from controller.agent.errors import (
    AgentError,
    FailedPrecondition,
    MachineNotFound,
    ProvisionFailed,
    ResourceExhausted,
)
from controller.agent.events import Event, EventBus, EventType
from controller.agent.provision import Provisioner
from controller.agent.spec import MachineSpec, Ref, validate_ref, validate_spec
from controller.agent.state import MachineRecord, State, StateStore

log = structlog.get_logger(__name__)


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Machines:
    def __init__(self, store: StateStore, provisioner: Provisioner, bus: EventBus) -> None:
        self.store = store
        self.prov = provisioner
        self.bus = bus
        self.records: dict[str, MachineRecord] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    @asynccontextmanager
    async def locked(self, uid: str) -> AsyncIterator[None]:
        async with self._locks[uid]:
            yield

    def busy(self, uid: str) -> bool:
        """An operation holds this VM's lock (the supervisor skips it this round)."""
        return self._locks[uid].locked()

    def emit(self, rec: MachineRecord, type_: EventType) -> None:
        self.store.save(rec)
        self.bus.publish(Event(type_, rec.ref, rec.generation, rec.state, rec.reason, rec.message))

    def get(self, uid: str) -> MachineRecord:
        try:
            return self.records[uid]
        except KeyError:
            raise MachineNotFound(uid) from None

    def reserved_memory(self) -> int:
        return sum(r.spec.memory_bytes for r in self.records.values())

    async def adopt_all(self) -> None:
        """At start-up: take over the VMs a previous agent left running, restart the rest
        per policy (through the supervisor)."""
        for rec in self.store.load_all():
            self.records[rec.ref.uid] = rec
            async with self.locked(rec.ref.uid):
                if rec.state is State.PROVISIONING:
                    await self._resume_provisioning(rec)
                else:
                    await self.prov.adopt(rec)
                    self.emit(rec, EventType.ADOPTED)

    async def _resume_provisioning(self, rec: MachineRecord) -> None:
        """The last agent died inside Deploy: finish it (every step is idempotent), or
        undo it as a failed Deploy would have."""
        try:
            await self.prov.adopt(rec)
            if rec.vmm is None or not rec.vmm.alive():
                await self.prov.provision(rec)
        except Exception as exc:
            log.warning("interrupted deploy could not be finished", uid=rec.ref.uid, error=str(exc))
            first = rec.started_at == 0  # never ran: forget it like a failed first Deploy
            await self.prov.teardown(rec, keep_data=not first)
            if first:
                self.records.pop(rec.ref.uid, None)
                self.store.remove(rec.ref.uid)
                return
            rec.vmm = None
            rec.state, rec.reason, rec.message = State.FAILED, "ProvisionFailed", str(exc)
            self.emit(rec, EventType.FAILED)
            return
        rec.state = State.PAUSED if rec.spec.paused else State.RUNNING
        self.emit(rec, EventType.DEPLOYED)

    async def deploy(
        self, ref: Ref, generation: int, spec: MachineSpec
    ) -> tuple[MachineRecord, bool]:
        validate_ref(ref)
        validate_spec(ref, spec)
        self.prov.check(ref, spec)
        async with self.locked(ref.uid):
            rec = self.records.get(ref.uid)
            if rec is None:
                return await self._create(ref, generation, spec), True
            if generation < rec.generation:
                raise FailedPrecondition(
                    f"zmachine {ref}: generation {generation} is older than the deployed "
                    f"generation {rec.generation}; refusing to roll back"
                )
            if generation == rec.generation:
                if spec != rec.spec and dataclasses.replace(spec, env=rec.spec.env) == rec.spec:
                    # Only env changed: a Secret it refers to has a new value. Roll it out.
                    await self._update(rec, generation, spec)
                    return rec, True
                if spec != rec.spec:
                    raise FailedPrecondition(
                        f"zmachine {ref}: generation {generation} is already deployed with a "
                        "different spec; send the new spec with a new generation"
                    )
                return rec, False
            await self._update(rec, generation, spec)
            return rec, True

    def _check_memory(self, ref: Ref, spec: MachineSpec, held: int = 0) -> None:
        """``held``: what this machine reserves already (an update may reuse it)."""
        free = host_memory() - self.reserved_memory() + held
        if spec.memory_bytes > free:
            raise ResourceExhausted(
                f"zmachine {ref}: spec.memory {spec.memory_bytes} bytes exceeds the node's "
                f"unreserved memory {max(free, 0)} bytes"
            )

    async def _create(self, ref: Ref, generation: int, spec: MachineSpec) -> MachineRecord:
        self._check_memory(ref, spec)
        rec = MachineRecord(ref=ref, generation=generation, spec=spec)
        self.records[ref.uid] = rec
        self.store.save(rec)
        try:
            await self.prov.provision(rec)
        except BaseException as exc:
            # Never leave half a VM behind: undo everything, forget the record, say why.
            log.warning("deploy failed, cleaning up", uid=ref.uid, error=str(exc))
            await self.prov.teardown(rec, keep_data=False)
            self.records.pop(ref.uid, None)
            self.store.remove(ref.uid)
            if isinstance(exc, AgentError):
                raise
            raise ProvisionFailed(f"zmachine {ref}", "deploy", exc) from exc
        self.emit(rec, EventType.DEPLOYED)
        return rec

    async def _update(self, rec: MachineRecord, generation: int, spec: MachineSpec) -> None:
        self._check_memory(rec.ref, spec, held=rec.spec.memory_bytes)
        await self.prov.check_root_size(rec, spec)
        await self.prov.check_share_sizes(rec, spec)
        if spec.boot_hash() == rec.spec.boot_hash():
            # Only `paused` may differ: apply it to the running VM, nothing else to do.
            if spec.paused != rec.spec.paused and rec.state in (State.RUNNING, State.PAUSED):
                await (self.prov.pause(rec) if spec.paused else self.prov.resume(rec))
            rec.generation, rec.spec = generation, spec
            self.emit(rec, EventType.UPDATED)
            return
        # A new VM from the new spec; the writable layer and volumes are kept (zos keeps
        # the rootfs volume across re-provisioning too). Saved as Provisioning first, so
        # an agent restart in between finishes the job instead of adopting half of it.
        rec.state = State.PROVISIONING
        self.store.save(rec)
        await self.prov.teardown(rec, keep_data=True)
        rec.generation, rec.spec = generation, spec
        rec.restarts = rec.crash_streak = 0
        rec.exit_code, rec.exit_reason = None, ""  # a new VM: no last exit yet
        try:
            await self.prov.provision(rec)
        except BaseException as exc:
            await self.prov.teardown(rec, keep_data=True)
            rec.vmm = None
            rec.state, rec.reason, rec.message = State.FAILED, "ProvisionFailed", str(exc)
            self.emit(rec, EventType.FAILED)
            if isinstance(exc, AgentError):
                raise
            raise ProvisionFailed(f"zmachine {rec.ref}", "update", exc) from exc
        self.emit(rec, EventType.UPDATED)

    async def delete(self, uid: str) -> bool:
        async with self.locked(uid):
            rec = self.records.get(uid)
            if rec is None:
                return False
            await self.prov.teardown(rec, keep_data=False)
            self.store.remove(uid)
            del self.records[uid]
            self.bus.publish(Event(EventType.DELETED, rec.ref, rec.generation, rec.state))
        self._locks.pop(uid, None)
        return True

    async def pause(self, uid: str) -> MachineRecord:
        return await self._power(uid, pause=True)

    async def resume(self, uid: str) -> MachineRecord:
        return await self._power(uid, pause=False)

    async def _power(self, uid: str, pause: bool) -> MachineRecord:
        async with self.locked(uid):
            rec = self.get(uid)
            if rec.state not in (State.RUNNING, State.PAUSED):
                verb = "pause" if pause else "resume"
                raise FailedPrecondition(f"zmachine {rec.ref} is {rec.state}, cannot {verb}")
            await (self.prov.pause(rec) if pause else self.prov.resume(rec))
            self.emit(rec, EventType.PAUSED if pause else EventType.RESUMED)
            return rec

    async def restart(self, uid: str) -> MachineRecord:
        async with self.locked(uid):
            rec = self.get(uid)
            await self.prov.stop(rec)
            rec.crash_streak = 0
            await self.prov.launch(rec)
            rec.restarts += 1
            self.emit(rec, EventType.RESTARTED)
            return rec
