"""Keeps every VM in the state its restart policy asks for.

Rules (docs/agent.md "Supervision"), as Kubernetes applies restartPolicy to containers:
* a VM that ends is restarted per restartPolicy: Always on any end, OnFailure only when it
  failed, Never never. Success is the container entrypoint's exit code 0 when our init
  reported one (its exit marker on the serial console), else a clean guest power-off.
  How the VM ended is the driver's GuestExit, read from the VMM's own events (so it
  survives an agent restart), never the bare exit status: cloud-hypervisor and QEMU exit
  0 on SIGTERM too;
* restarts wait an exponential backoff (base * 2^(streak-1), capped);
* more than ``crash_loop_limit`` consecutive exits end in FAILED with reason CrashLoop
  and the tail of the VM's logs; a VMM that stays up ``healthy_after`` resets the streak;
* a guest reboot keeps the VM in its VMM; a virtiofsd that exited with the reboot's
  disconnect (cloud-hypervisor) is started again at once, driven by the VMM's reboot
  event, and every round as a fallback;
* a VM is looked at as soon as its VMM exits, its guest stops or panics, or its console
  shows the boot marker (wake-ups from the VM's follower, no polling); the rounds every
  ``interval`` are the fallback and drive the timers (backoff, healthy_after).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from controller.agent.config import Supervision
from controller.agent.hypervisor import ExitRecord, GuestEvent
from controller.agent.runtime.events import EventType
from controller.agent.runtime.machines import Machines
from controller.agent.runtime.state import MachineRecord, State
from controller.agent.spec import RestartPolicy

log = structlog.get_logger(__name__)


# Seconds for the old virtiofsd to exit after cloud-hypervisor's reboot event (it does
# once CH drops the connection) before a new one takes its socket path.
REBOOT_SHARE_WAIT = 3.0


@dataclass(frozen=True)
class _Outcome:
    clean: bool  # a success for restartPolicy OnFailure/Never
    reason: str  # the machine's reason when it ends there
    what: str  # for messages: what stopped, with which code


class Supervisor:
    def __init__(self, machines: Machines, rules: Supervision) -> None:
        self.machines = machines
        self.rules = rules
        self._next_start: dict[str, float] = {}
        self._looking: set[str] = set()  # VMs being looked at on a wake-up

    async def run(self) -> None:
        events = asyncio.create_task(self._guest_events())
        try:
            await self._rounds()
        finally:
            events.cancel()

    async def _guest_events(self) -> None:
        looks: set[asyncio.Task[None]] = set()
        while True:
            uid, event = await self.machines.prov.guest_events.get()
            if event is not GuestEvent.REBOOT:
                # Look at it now, beside this loop: a VM that ended is stopped and
                # restarted under its lock, which takes seconds. One look per VM at a time.
                if uid not in self._looking and not self.machines.busy(uid):
                    self._looking.add(uid)
                    task = asyncio.create_task(self._look(uid))
                    looks.add(task)
                    task.add_done_callback(looks.discard)
                continue
            try:
                async with self.machines.locked(uid):
                    rec = self.machines.records.get(uid)
                    if rec is None or rec.state not in (State.RUNNING, State.PAUSED):
                        continue
                    if await self.machines.prov.restart_dead_shares(rec, REBOOT_SHARE_WAIT):
                        await self.machines.store.save(rec)
            except Exception:
                log.exception("restarting virtiofsd after a guest reboot failed", uid=uid)

    async def _look(self, uid: str) -> None:
        try:
            await self.check(uid)
        except Exception:
            log.exception("supervision step failed", uid=uid)
        finally:
            self._looking.discard(uid)

    async def _rounds(self) -> None:
        while True:
            for uid in list(self.machines.records):
                if self.machines.busy(uid):
                    continue  # a Deploy/Delete is working on it; look again next round
                try:
                    await self.check(uid)
                except Exception:
                    log.exception("supervision step failed", uid=uid)
            await asyncio.sleep(self.rules.interval)

    async def check(self, uid: str) -> None:
        async with self.machines.locked(uid):
            rec = self.machines.records.get(uid)
            if rec is None:
                return
            if rec.state in (State.RUNNING, State.PAUSED):
                await self._watch(rec)
            elif rec.state is State.RESTARTING and time.monotonic() >= self._next_start.get(uid, 0):
                await self._relaunch(rec)

    async def _watch(self, rec: MachineRecord) -> None:
        prov = self.machines.prov
        ended = await prov.guest_exit(rec)
        if ended is None:
            booted = prov.observe(rec)
            changed = await prov.restart_dead_shares(rec)
            if rec.crash_streak and time.time() - rec.started_at > self.rules.healthy_after:
                rec.crash_streak = 0
                changed = True
            if booted:  # watchers learn of it (Ready) without asking
                await self.machines.emit(rec, EventType.BOOTED)
            elif changed:
                await self.machines.store.save(rec)
            return
        outcome = self._outcome(rec, ended)
        bind = log.bind(zmachine=f"{rec.ref.namespace}/{rec.ref.name}", uid=rec.ref.uid)
        policy = rec.spec.restart_policy
        bind.info(
            "vm ended", exit=ended.exit.value, detail=ended.detail, exit_code=rec.exit_code,
            clean=outcome.clean, policy=policy.value,
        )  # fmt: skip
        rec.last_exit = ended.exit.value
        await prov.stop(rec)
        if policy is RestartPolicy.NEVER or (policy is RestartPolicy.ON_FAILURE and outcome.clean):
            rec.state = State.SUCCEEDED if outcome.clean else State.FAILED
            rec.reason = outcome.reason
            rec.message = f"{outcome.what}; restartPolicy is {policy.value}"
            rec.log_tail = prov.log_tail(rec)
            await self.machines.emit(rec, EventType.EXITED if outcome.clean else EventType.FAILED)
            return
        rec.crash_streak += 1
        if rec.crash_streak > self.rules.crash_loop_limit:
            await self._fail(
                rec, f"the VM ended {rec.crash_streak} times in a row (last: {outcome.what})"
            )
            return
        delay = self._backoff(rec)
        self._next_start[rec.ref.uid] = time.monotonic() + delay
        rec.state, rec.reason = State.RESTARTING, "BackOff"
        rec.message = f"{outcome.what}; restarting in {delay:.0f}s"
        await self.machines.emit(rec, EventType.EXITED)

    def _outcome(self, rec: MachineRecord, ended: ExitRecord) -> _Outcome:
        """Why the VM stopped. Our init's exit marker (container mode with an entrypoint)
        gives the entrypoint's code, recorded on ``rec``; without one, how the VM ended
        (the driver's GuestExit) decides."""
        prov = self.machines.prov
        exited = prov.entrypoint_exit(rec)
        if exited is not None:
            rec.exit_code, rec.exit_reason = exited.code, exited.reason
            return _Outcome(
                exited.code == 0,
                exited.reason,
                f"the entrypoint exited with code {exited.code} ({exited.reason})",
            )
        clean = ended.exit.clean
        return _Outcome(
            clean,
            "PoweredOff" if clean else "VMMExited",
            f"the VM ended: {ended.exit.value} ({ended.detail})",
        )

    async def _relaunch(self, rec: MachineRecord) -> None:
        try:
            await self.machines.prov.launch(rec)
        except Exception as exc:
            # The attempt's virtiofsd (and VMM) must go: a virtiofsd left on the share's
            # socket makes every later attempt fail.
            await self.machines.prov.stop(rec)
            rec.crash_streak += 1
            if rec.crash_streak > self.rules.crash_loop_limit:
                await self._fail(rec, f"restart failed {rec.crash_streak} times in a row: {exc}")
            else:
                delay = self._backoff(rec)
                self._next_start[rec.ref.uid] = time.monotonic() + delay
                rec.message = f"restart failed, retrying in {delay:.0f}s: {exc}"
                await self.machines.store.save(rec)
            return
        rec.restarts += 1
        await self.machines.emit(rec, EventType.RESTARTED)

    def _backoff(self, rec: MachineRecord) -> float:
        delay: float = self.rules.backoff_base * 2 ** (rec.crash_streak - 1)
        return min(delay, self.rules.backoff_max)

    async def _fail(self, rec: MachineRecord, why: str) -> None:
        rec.state, rec.reason, rec.message = State.FAILED, "CrashLoop", why
        rec.log_tail = self.machines.prov.log_tail(rec)
        await self.machines.emit(rec, EventType.FAILED)
