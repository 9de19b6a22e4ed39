"""Machine records at rest: env values (Secrets resolved) are sealed with the node key."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from controller.agent.runtime.procs import ProcessRef
from controller.agent.runtime.state import MachineRecord, StateStore
from controller.agent.spec import MachineSpec, Ref

SECRET = "s3cr3t-value-for-the-test"


def record() -> MachineRecord:
    spec = MachineSpec(
        flist="file:///x.fl", cpu=1, memory_bytes=256 << 20, env={"TOKEN": SECRET, "E": ""}
    )
    return MachineRecord(ref=Ref("default", "web", "u-1"), generation=1, spec=spec)


def test_env_is_sealed_at_rest_and_reads_back(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "machines")
    asyncio.run(store.save(record()))
    key = tmp_path / "node.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    text = store.path("u-1").read_text()
    assert SECRET not in text and "TOKEN" in text
    # A restarted agent (a new store on the same dir and key) reads the same record.
    loaded = StateStore(tmp_path / "machines").load_all()
    assert [r.spec.env for r in loaded] == [{"TOKEN": SECRET, "E": ""}]


def test_a_plaintext_record_from_an_older_agent_loads_and_is_sealed_on_save(
    tmp_path: Path,
) -> None:
    machines = tmp_path / "machines"
    machines.mkdir()
    (machines / "u-1.json").write_text(json.dumps(record().to_json()))
    store = StateStore(machines)
    [loaded] = store.load_all()
    assert loaded.spec.env["TOKEN"] == SECRET
    asyncio.run(store.save(loaded))
    assert SECRET not in store.path("u-1").read_text()


def test_another_nodes_key_cannot_read_it(tmp_path: Path) -> None:
    asyncio.run(StateStore(tmp_path / "machines").save(record()))
    (tmp_path / "node.key").unlink()
    assert StateStore(tmp_path / "machines").load_all() == []  # skipped, logged


def test_only_a_save_waits_for_the_disk(tmp_path: Path, monkeypatch: Any) -> None:
    """A provisioning checkpoint is written without fsync (an agent crash keeps it; a host
    crash leaves nothing it names running), and only when more than its progress message
    changed; every save is written and fsynced. Both replace the file whole and read back."""
    synced: list[int] = []
    real = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    store = StateStore(tmp_path / "machines")
    rec = record()
    path = store.path("u-1")

    async def steps() -> None:
        await store.save(rec)  # the first also makes the node key
        synced.clear()
        await store.save(rec)
        assert len(synced) == 1
        written = path.stat().st_ino
        rec.message = "starting the VMM"
        await store.checkpoint(rec)
        assert path.stat().st_ino == written, "a new message alone was written"
        rec.helpers = [ProcessRef(pid=os.getpid(), start_time=1, marker="virtiofsd")]
        await store.checkpoint(rec)
        assert len(synced) == 1 and path.stat().st_ino != written
        [loaded] = StateStore(tmp_path / "machines").load_all()
        assert loaded.helpers == rec.helpers and loaded.message == rec.message
        written = path.stat().st_ino
        await store.checkpoint(rec)
        assert path.stat().st_ino == written, "nothing changed, yet it was written"
        await store.remove("u-1")
        await store.checkpoint(rec)  # forgotten with the file: written again

    asyncio.run(steps())
    assert [p.name for p in (tmp_path / "machines").iterdir()] == ["u-1.json"]


def test_writes_wait_on_the_disk_off_the_event_loop_and_land_in_order(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A slow disk (each fsync 0.2 s) holds up neither the event loop nor the order: the
    last of several saves made at once is the one on disk, and a removal after them
    removes."""
    real = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.2)
        real(fd)

    store = StateStore(tmp_path / "machines")
    asyncio.run(store.save(record()))  # the node key, before the disk turns slow
    monkeypatch.setattr(os, "fsync", slow_fsync)
    ticks = 0

    async def ticking() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    async def saves(then_remove: bool) -> None:
        ticker = asyncio.create_task(ticking())
        versions = [dataclasses.replace(record(), message=f"v{i}") for i in range(5)]
        await asyncio.gather(*(store.save(v) for v in versions))
        if then_remove:
            await asyncio.gather(store.save(versions[0]), store.remove("u-1"))
        ticker.cancel()

    started = time.monotonic()
    asyncio.run(saves(then_remove=False))
    assert time.monotonic() - started >= 1.0  # five fsyncs, one after the other
    assert ticks >= 20, f"the event loop ran only {ticks} times while the disk was slow"
    assert [r.message for r in store.load_all()] == ["v4"]
    asyncio.run(saves(then_remove=True))
    assert list((tmp_path / "machines").iterdir()) == []
