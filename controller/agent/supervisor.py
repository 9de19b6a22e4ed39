"""Keeps every VM in the state its restart policy asks for.

Rules (docs/agent.md "Supervision"):
* a VMM that exits is restarted per restartPolicy: Always restarts on any exit, OnFailure
  only when the exit was not a clean guest power-off (exit status 0), Never never;
* restarts wait an exponential backoff (base * 2^(streak-1), capped);
* more than ``crash_loop_limit`` consecutive exits end in FAILED with reason CrashLoop
  and the tail of the VM's logs; a VMM that stays up ``healthy_after`` resets the streak;
* an exit whose status is unknown (the VMM was adopted from a previous agent, so it is
  not our child) is clean only if the serial console ends with the guest kernel's
  power-off message, else a failure.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from controller.agent.config import Supervision
from controller.agent.events import EventType
from controller.agent.hypervisor import ExitStatus
from controller.agent.machines import Machines
from controller.agent.procs import exit_code
from controller.agent.spec import RestartPolicy
from controller.agent.state import MachineRecord, State

log = structlog.get_logger(__name__)


class Supervisor:
    def __init__(self, machines: Machines, rules: Supervision) -> None:
        self.machines = machines
        self.rules = rules
        self._next_start: dict[str, float] = {}

    async def run(self) -> None:
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
        if rec.vmm is not None and rec.vmm.alive():
            changed = prov.observe(rec)
            if rec.crash_streak and time.time() - rec.started_at > self.rules.healthy_after:
                rec.crash_streak = 0
                changed = True
            if changed:
                self.machines.store.save(rec)
            return
        code = exit_code(rec.vmm) if rec.vmm is not None else None
        # Not our child (adopted after an agent restart): the guest kernel's last words
        # on the serial console tell a power-off from a crash.
        clean = code == 0 or (code is None and prov.guest_powered_off(rec))
        bind = log.bind(zmachine=f"{rec.ref.namespace}/{rec.ref.name}", uid=rec.ref.uid)
        how = ExitStatus(code).describe() if code is not None else "exited (status unknown)"
        bind.info("vmm exited", exit_code=code, clean=clean, policy=rec.spec.restart_policy.value)
        await prov.stop(rec)
        policy = rec.spec.restart_policy
        if policy is RestartPolicy.NEVER or (policy is RestartPolicy.ON_FAILURE and clean):
            rec.state = State.SUCCEEDED if clean else State.FAILED
            rec.reason = "PoweredOff" if clean else "VMMExited"
            rec.message = f"VMM: {how}; restartPolicy is {policy.value}"
            rec.log_tail = prov.log_tail(rec)
            self.machines.emit(rec, EventType.EXITED if clean else EventType.FAILED)
            return
        rec.crash_streak += 1
        if rec.crash_streak > self.rules.crash_loop_limit:
            self._fail(rec, f"the VMM exited {rec.crash_streak} times in a row (last: {how})")
            return
        delay = self._backoff(rec)
        self._next_start[rec.ref.uid] = time.monotonic() + delay
        rec.state, rec.reason = State.RESTARTING, "BackOff"
        rec.message = f"VMM: {how}; restarting in {delay:.0f}s"
        self.machines.emit(rec, EventType.EXITED)

    async def _relaunch(self, rec: MachineRecord) -> None:
        try:
            await self.machines.prov.launch(rec)
        except Exception as exc:
            # The attempt's virtiofsd (and VMM) must go: a virtiofsd left on the share's
            # socket makes every later attempt fail.
            await self.machines.prov.stop(rec)
            rec.crash_streak += 1
            if rec.crash_streak > self.rules.crash_loop_limit:
                self._fail(rec, f"restart failed {rec.crash_streak} times in a row: {exc}")
            else:
                delay = self._backoff(rec)
                self._next_start[rec.ref.uid] = time.monotonic() + delay
                rec.message = f"restart failed, retrying in {delay:.0f}s: {exc}"
                self.machines.store.save(rec)
            return
        rec.restarts += 1
        self.machines.emit(rec, EventType.RESTARTED)

    def _backoff(self, rec: MachineRecord) -> float:
        delay: float = self.rules.backoff_base * 2 ** (rec.crash_streak - 1)
        return min(delay, self.rules.backoff_max)

    def _fail(self, rec: MachineRecord, why: str) -> None:
        rec.state, rec.reason, rec.message = State.FAILED, "CrashLoop", why
        rec.log_tail = self.machines.prov.log_tail(rec)
        self.machines.emit(rec, EventType.FAILED)
