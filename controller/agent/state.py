"""Per-VM records on disk: one JSON file per Zmachine, replaced atomically.

The record is the agent's memory across restarts: it holds the spec, the identities of
the detached processes (to adopt them) and everything Delete must undo.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from controller.agent.procs import ProcessRef
from controller.agent.spec import MachineSpec, Ref

log = structlog.get_logger(__name__)


class State(StrEnum):
    PROVISIONING = "Provisioning"
    RUNNING = "Running"
    PAUSED = "Paused"
    RESTARTING = "Restarting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True)
class NicStatus:
    network: str
    ip: str
    mac: str
    tap: str


@dataclass
class MachineRecord:
    ref: Ref
    generation: int
    spec: MachineSpec
    state: State = State.PROVISIONING
    reason: str = ""
    message: str = ""
    boot_mode: str = ""
    hypervisor: str = ""
    vmm: ProcessRef | None = None
    helpers: list[ProcessRef] = field(default_factory=list)  # virtiofsd, FUSE mount
    nics: list[NicStatus] = field(default_factory=list)
    restarts: int = 0
    crash_streak: int = 0  # consecutive quick exits, for the crash-loop rule
    started_at: float = 0.0  # wall clock of the last VMM start
    boot_duration: float = 0.0  # seconds from VMM start to the guest's first output
    log_tail: str = ""
    last_exit: str = ""  # hypervisor.GuestExit of the last VM end the supervisor saw

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["spec"] = self.spec.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MachineRecord:
        return cls(
            **{
                **data,
                "ref": Ref(**data["ref"]),
                "spec": MachineSpec.from_json(data["spec"]),
                "state": State(data["state"]),
                "vmm": ProcessRef(**data["vmm"]) if data["vmm"] else None,
                "helpers": [ProcessRef(**h) for h in data["helpers"]],
                "nics": [NicStatus(**n) for n in data["nics"]],
            }
        )


class StateStore:
    """Reads and writes ``<dir>/<uid>.json``; writes go through a temp file + rename."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, uid: str) -> Path:
        return self.directory / f"{uid}.json"

    def save(self, record: MachineRecord) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record.to_json(), f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(record.ref.uid))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def remove(self, uid: str) -> None:
        self.path(uid).unlink(missing_ok=True)

    def load_all(self) -> list[MachineRecord]:
        records = []
        for path in sorted(self.directory.glob("*.json")):
            if path.name.startswith(".tmp-"):
                path.unlink(missing_ok=True)  # an interrupted write; the old file is intact
                continue
            try:
                records.append(MachineRecord.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("unreadable machine record, skipped", path=str(path), error=str(exc))
        return records
