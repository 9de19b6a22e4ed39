"""Per-VM records on disk: one JSON file per Zmachine, replaced atomically.

The record is the agent's memory across restarts: it holds the spec, the identities of
the detached processes (to adopt them) and everything Delete must undo. Env values arrive
with Secrets resolved, so they are sealed at rest: encrypted (Fernet) with a per-node key,
``<state>/node.key`` (mode 0600, made on first start). A record from an agent before that
(plaintext env) still loads and is sealed on its next save.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog
from cryptography.fernet import Fernet, InvalidToken

from controller.agent.runtime.procs import ProcessRef
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
    ipv6: str = ""


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
    boot_nonce: str = ""  # per VMM start, on the kernel command line; stamps the exit marker
    exit_code: int | None = None  # the container entrypoint's last exit, from its marker
    exit_reason: str = ""  # Completed, Error, NotFound, NotExecutable, InitError
    flist_mount: str = ""  # the node's shared flist mount this VM uses (FlistMounts key)

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


def _digest(data: dict[str, Any]) -> bytes:
    """What a record holds, its progress message aside (env values unsealed: in memory)."""
    text = json.dumps({**data, "message": ""}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class StateStore:
    """Reads and writes ``<dir>/<uid>.json``; writes go through a temp file + rename.
    Env values are sealed with the key at ``key_path`` (default ``<dir>/../node.key``)."""

    def __init__(self, directory: Path, key_path: Path | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fernet = Fernet(_node_key(key_path or directory.parent / "node.key"))
        self._saved: dict[str, bytes] = {}  # uid -> digest of the record last written
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="records")

    def path(self, uid: str) -> Path:
        return self.directory / f"{uid}.json"

    async def save(self, record: MachineRecord) -> None:
        """Replace the record's file atomically, fsynced first so that it survives a host
        crash too; returns once it is on disk."""
        data = record.to_json()
        await self._write_record(record.ref.uid, data, _digest(data), durable=True)

    async def checkpoint(self, record: MachineRecord) -> None:
        """A provisioning checkpoint: written without fsync, which an agent crash survives
        (after a host crash the processes it names are gone anyway), and only when more
        than the progress message changed since the last write (two of a deploy's seven
        steps change only the message)."""
        data = record.to_json()
        digest = _digest(data)
        if self._saved.get(record.ref.uid) != digest:
            await self._write_record(record.ref.uid, data, digest, durable=False)

    async def remove(self, uid: str) -> None:
        await self._in_order(self.path(uid).unlink, True)  # missing_ok
        self._saved.pop(uid, None)

    async def _write_record(
        self, uid: str, data: dict[str, Any], digest: bytes, durable: bool
    ) -> None:
        self._saved[uid] = digest  # in submission order, as the writes
        try:
            await self._in_order(self._write, uid, data, durable)
        except BaseException:
            self._saved.pop(uid, None)  # not known to be written: the next one writes
            raise

    async def _in_order(self, write: Callable[..., object], *args: object) -> None:
        """Run a file operation on the store's one writer thread. The event loop never
        waits on the disk (an fsync, or a rename over the old file, which ext4 flushes:
        a fifth of an agent's event loop in a burst of deploys), and one thread keeps the
        order: a later save of a record never lands before an earlier one, nor a save
        after its removal."""
        await asyncio.get_running_loop().run_in_executor(self._writer, write, *args)

    def _write(self, uid: str, data: dict[str, Any], durable: bool) -> None:
        env = data["spec"]["env"]
        data["spec"]["env"] = {k: self._fernet.encrypt(v.encode()).decode() for k, v in env.items()}
        data[_SEALED] = True
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.replace(tmp, self.path(uid))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_all(self) -> list[MachineRecord]:
        records = []
        for path in sorted(self.directory.glob("*.json")):
            if path.name.startswith(".tmp-"):
                path.unlink(missing_ok=True)  # an interrupted write; the old file is intact
                continue
            try:
                records.append(self._load(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError, InvalidToken) as exc:
                log.error(
                    "unreadable machine record, skipped",
                    path=str(path),
                    error=str(exc) or type(exc).__name__,
                )
        return records

    def _load(self, data: dict[str, Any]) -> MachineRecord:
        if data.pop(_SEALED, False):
            env = data["spec"]["env"]
            data["spec"]["env"] = {k: self._fernet.decrypt(v).decode() for k, v in env.items()}
        return MachineRecord.from_json(data)


_SEALED = "env_sealed"


def _node_key(path: Path) -> bytes:
    """The node's Fernet key, created (0600, exclusively) on first use."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    key = Fernet.generate_key()
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return key
