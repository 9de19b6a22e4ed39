"""The agent's machine table: Deploy/Delete/Pause/Resume/Restart with one lock per VM.

Every operation on a VM holds that VM's asyncio.Lock (the supervisor too), so work on
different VMs runs concurrently while two operations on one VM never interleave.
Provisioning runs in a background task owned by this table, not by the Deploy RPC: a
cancelled or timed-out call, and the agent's own shutdown, never tear a machine down.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog

from controller.agent.config import host_memory
from controller.agent.errors import FailedPrecondition, MachineNotFound, ResourceExhausted
from controller.agent.faults import Faults
from controller.agent.guest.provision import Provisioner
from controller.agent.runtime.events import Event, EventBus, EventType
from controller.agent.runtime.state import MachineRecord, State, StateStore
from controller.agent.spec import MachineSpec, Ref, validate_ref, validate_spec

log = structlog.get_logger(__name__)


@dataclass
class _Job:
    """A provisioning running in the background, owned by Machines (never by an RPC).

    While it runs it owns the machine's host state; whoever cancels it waits for it to end
    and then tears down or re-provisions. It stops at its next checkpoint (between steps,
    so never in the middle of a mount or a copy), or at once while it waits at a fault point.
    """

    task: asyncio.Task[None]
    generation: int  # what it provisions: a Deploy of the same is answered unchanged
    spec: MachineSpec
    cancelled: bool = False
    at_fault_point: bool = False


class ProvisioningCancelled(asyncio.CancelledError):
    """A Delete or a newer generation stopped the provisioning at a checkpoint."""


class Machines:
    def __init__(
        self,
        store: StateStore,
        provisioner: Provisioner,
        bus: EventBus,
        faults: Faults | None = None,
        memory: int | None = None,
    ) -> None:
        """`memory`: the guest memory this node hands out (default: physical memory)."""
        self.memory = memory or host_memory()
        self.store = store
        self.prov = provisioner
        self.bus = bus
        self.faults = faults if faults is not None else Faults.from_env()
        self.records: dict[str, MachineRecord] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._jobs: dict[str, _Job] = {}
        provisioner.checkpoint = self._checkpoint

    @asynccontextmanager
    async def locked(self, uid: str) -> AsyncIterator[None]:
        async with self._locks[uid]:
            yield

    def busy(self, uid: str) -> bool:
        """An operation holds this VM's lock or provisions it (the supervisor skips it)."""
        return self._locks[uid].locked() or uid in self._jobs

    def provisioning(self, uid: str) -> bool:
        return uid in self._jobs

    async def emit(self, rec: MachineRecord, type_: EventType) -> None:
        await self.store.save(rec)
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
        per policy (through the supervisor), and go on with interrupted provisioning in
        the background."""
        records = self.store.load_all()
        for rec in records:
            self.prov.claim_flist(rec)  # all users counted before any mount is judged
        await self.prov.flists.sweep()
        for rec in records:
            self.records[rec.ref.uid] = rec
            async with self.locked(rec.ref.uid):
                if rec.state is State.PROVISIONING:
                    await self._start(
                        rec, rec.generation, rec.spec, EventType.DEPLOYED, resume=True
                    )
                    continue
                await self.prov.adopt(rec)
                await self.emit(rec, EventType.ADOPTED)

    # ----------------------------------------------------------------- provisioning

    async def _start(
        self,
        rec: MachineRecord,
        generation: int,
        spec: MachineSpec,
        event: EventType,
        resume: bool = False,
    ) -> None:
        """Provision ``rec`` to (generation, spec) in the background; the record says
        Provisioning on disk first, so an agent restart goes on with it. The caller holds
        the machine's lock, so that nothing sees it Provisioning without its job."""
        rec.state, rec.reason, rec.message, rec.log_tail = State.PROVISIONING, "", "queued", ""
        await self.store.save(rec)
        task = asyncio.create_task(self._provision(rec, generation, spec, event, resume))
        job = _Job(task, generation, spec)
        self._jobs[rec.ref.uid] = job

        def done(_: asyncio.Task[None]) -> None:
            if self._jobs.get(rec.ref.uid) is job:
                del self._jobs[rec.ref.uid]

        task.add_done_callback(done)

    async def _provision(
        self,
        rec: MachineRecord,
        generation: int,
        spec: MachineSpec,
        event: EventType,
        resume: bool,
    ) -> None:
        """The job's body. ``resume``: a previous agent died while provisioning this
        record: adopt what it left (a VMM already started is kept), finish the rest."""
        lg = log.bind(zmachine=f"{rec.ref.namespace}/{rec.ref.name}", uid=rec.ref.uid)
        first = rec.started_at == 0  # no VMM ever ran: nothing of the guest's to keep
        try:
            if resume:
                await self.prov.adopt(rec)
                if rec.vmm is not None and rec.vmm.alive():
                    rec.state = State.PAUSED if rec.spec.paused else State.RUNNING
                    rec.message = ""
                    await self.emit(rec, event)
                    return
                # virtiofsd the dead agent started (recorded at a checkpoint) must go.
                await self.prov.stop(rec)
            elif (rec.generation, rec.spec) != (generation, spec) or rec.vmm is not None:
                # An older generation's VM, or what a cancelled provisioning left: down
                # first; the writable layer and volumes stay unless nothing ever ran.
                rec.message = "stopping the previous VM"
                await self.prov.teardown(rec, keep_data=not first)
                rec.vmm = None
            rec.generation, rec.spec = generation, spec
            rec.restarts = rec.crash_streak = 0
            rec.exit_code, rec.exit_reason = None, ""  # a new VM: no last exit yet
            rec.message = "fetching flist"
            await self.store.save(rec)
            await self.prov.provision(rec)
        except asyncio.CancelledError:
            lg.info("provisioning stopped", generation=generation)
            raise
        except Exception as exc:
            lg.warning("provisioning failed, undoing it", error=str(exc))
            try:
                await self.prov.teardown(rec, keep_data=not first)
            except Exception as undo:
                lg.exception("undoing a failed provisioning failed", error=str(undo))
            rec.vmm = None
            rec.state, rec.reason, rec.message = State.FAILED, "ProvisionFailed", str(exc)
            await self.emit(rec, EventType.FAILED)
            return
        rec.state = State.PAUSED if rec.spec.paused else State.RUNNING
        rec.message = ""
        # A guest that handed over already (a fast boot) is reported with this event,
        # not with a Booted one right after (one status write instead of two).
        await self.prov.observe_started(rec)
        await self.emit(rec, event)

    async def _checkpoint(self, rec: MachineRecord, point: str, progress: str) -> None:
        """Between provisioning steps (and around every VMM start): record progress, stop
        here if cancelled, then the fault point."""
        job = self._jobs.get(rec.ref.uid)
        if job is None or job.task is not asyncio.current_task():
            await self.faults.point(point)  # a restart by the supervisor or the Restart RPC
            return
        if job.cancelled:
            raise ProvisioningCancelled(point)
        rec.message = progress
        # What is made so far (helpers, VMM) is known after an agent crash.
        await self.store.checkpoint(rec)
        job.at_fault_point = True
        try:
            await self.faults.point(point)
        finally:
            job.at_fault_point = False

    async def _cancel(self, uid: str) -> None:
        """Stop the background provisioning of ``uid`` and wait until it has ended."""
        job = self._jobs.get(uid)
        if job is None:
            return
        job.cancelled = True
        if job.at_fault_point:
            job.task.cancel()
        await asyncio.wait({job.task})
        self._jobs.pop(uid, None)

    # ----------------------------------------------------------------- RPCs

    async def deploy(
        self, ref: Ref, generation: int, spec: MachineSpec
    ) -> tuple[MachineRecord, bool]:
        """Checks the request and starts provisioning in the background; returns at once
        (the record says Provisioning, then Running or Failed)."""
        validate_ref(ref)
        validate_spec(ref, spec)
        self.prov.check(ref, spec)
        async with self.locked(ref.uid):
            rec = self.records.get(ref.uid)
            if rec is None:
                self._check_memory(ref, spec)
                rec = MachineRecord(ref=ref, generation=generation, spec=spec)
                self.records[ref.uid] = rec
                await self._start(rec, generation, spec, EventType.DEPLOYED)
                return rec, True
            job = self._jobs.get(ref.uid)
            deployed = (job.generation, job.spec) if job else (rec.generation, rec.spec)
            if generation < deployed[0]:
                raise FailedPrecondition(
                    f"zmachine {ref}: generation {generation} is older than the deployed "
                    f"generation {deployed[0]}; refusing to roll back"
                )
            if generation == deployed[0]:
                only_env = dataclasses.replace(spec, env=deployed[1].env) == deployed[1]
                if spec != deployed[1] and only_env:
                    # Only env changed: a Secret it refers to has a new value. Roll it out.
                    if job is not None:
                        await self._cancel(ref.uid)
                        await self._start(rec, generation, spec, self._event_for(rec))
                    else:
                        await self._update(rec, generation, spec)
                    return rec, True
                if spec != deployed[1]:
                    raise FailedPrecondition(
                        f"zmachine {ref}: generation {generation} is already deployed with a "
                        "different spec; send the new spec with a new generation"
                    )
                if job is None and rec.state is State.FAILED and rec.reason == "ProvisionFailed":
                    # The documented retry: the next Deploy provisions again.
                    await self._start(rec, generation, spec, self._event_for(rec))
                    return rec, True
                return rec, False
            if job is not None:
                # A newer generation while provisioning: stop that, then start over.
                await self._cancel(ref.uid)
                self._check_memory(ref, spec, held=rec.spec.memory_bytes)
                await self._start(rec, generation, spec, self._event_for(rec))
                return rec, True
            await self._update(rec, generation, spec)
            return rec, True

    @staticmethod
    def _event_for(rec: MachineRecord) -> EventType:
        return EventType.DEPLOYED if rec.started_at == 0 else EventType.UPDATED

    def _check_memory(self, ref: Ref, spec: MachineSpec, held: int = 0) -> None:
        """``held``: what this machine reserves already (an update may reuse it)."""
        free = self.memory - self.reserved_memory() + held
        if spec.memory_bytes > free:
            raise ResourceExhausted(
                f"zmachine {ref}: spec.memory {spec.memory_bytes} bytes exceeds the node's "
                f"unreserved memory {max(free, 0)} bytes"
            )

    async def _update(self, rec: MachineRecord, generation: int, spec: MachineSpec) -> None:
        self._check_memory(rec.ref, spec, held=rec.spec.memory_bytes)
        await self.prov.check_root_size(rec, spec)
        await self.prov.check_share_sizes(rec, spec)
        running = rec.state in (State.RUNNING, State.PAUSED)
        if spec.boot_hash() == rec.spec.boot_hash() and running:
            # Only `paused` may differ: apply it to the running VM, nothing else to do.
            if spec.paused != rec.spec.paused:
                await (self.prov.pause(rec) if spec.paused else self.prov.resume(rec))
            rec.generation, rec.spec = generation, spec
            await self.emit(rec, EventType.UPDATED)
            return
        # A new VM from the new spec, in the background; the writable layer and volumes
        # are kept (zos keeps the rootfs volume across re-provisioning too).
        await self._start(rec, generation, spec, self._event_for(rec))

    async def delete(self, uid: str) -> bool:
        # Shielded: a Delete whose RPC is cancelled half-way still finishes.
        return await asyncio.shield(self._delete(uid))

    async def _delete(self, uid: str) -> bool:
        async with self.locked(uid):
            rec = self.records.get(uid)
            if rec is None:
                return False
            await self._cancel(uid)
            await self.prov.teardown(rec, keep_data=False)
            await self.store.remove(uid)
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
            if self.provisioning(uid) or rec.state not in (State.RUNNING, State.PAUSED):
                verb = "pause" if pause else "resume"
                raise FailedPrecondition(f"zmachine {rec.ref} is {rec.state}, cannot {verb}")
            await (self.prov.pause(rec) if pause else self.prov.resume(rec))
            await self.emit(rec, EventType.PAUSED if pause else EventType.RESUMED)
            return rec

    async def restart(self, uid: str) -> MachineRecord:
        async with self.locked(uid):
            rec = self.get(uid)
            if self.provisioning(uid):
                raise FailedPrecondition(f"zmachine {rec.ref} is {rec.state}, cannot restart")
            await self.prov.stop(rec)
            rec.crash_streak = 0
            await self.prov.launch(rec)
            rec.restarts += 1
            await self.emit(rec, EventType.RESTARTED)
            return rec
