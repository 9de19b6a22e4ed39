"""The console RPCs: a shared interactive session on a VM's serial port, and its log.

Both read the VM's ``ConsoleStream`` (runtime/console.py), which outlives VMM restarts and
guest reboots, so a client stays attached through them; the machine's state is sent
whenever it changes, for clients to show that the VM is not running. An agent restart
ends the call: the console server attaches again (docs/console.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

from controller.agent.errors import InvalidSpec
from controller.agent.rpc.convert import state_to_pb
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.runtime.console import ConsoleStream
from controller.agent.runtime.machines import Machines

log = structlog.get_logger(__name__)

STATE_POLL_SECONDS = 0.5  # how soon a state change reaches attached clients
LOG_CHUNK = 64 * 1024
TAIL_SCAN_LIMIT = 8 << 20  # a tail never reads more than this much of the log


def _stream(machines: Machines, uid: str) -> ConsoleStream:
    rec = machines.get(uid)
    return machines.prov.host.console(rec, machines.prov.paths(rec))


async def attach(
    machines: Machines, requests: AsyncIterator[pb.ConsoleInput]
) -> AsyncIterator[pb.ConsoleOutput]:
    """The AttachConsole stream: history and live output out, keystrokes in."""
    try:
        first = await anext(requests)
    except StopAsyncIteration:
        return
    if first.WhichOneof("kind") != "attach":
        raise InvalidSpec("console: the first message must be attach")
    uid = first.attach.uid
    stream = _stream(machines, uid)  # MachineNotFound for an unknown uid
    rec = machines.get(uid)
    bound = log.bind(zmachine=f"{rec.ref.namespace}/{rec.ref.name}", uid=uid)
    bound.info("console attached", history=first.attach.history)
    out: asyncio.Queue[pb.ConsoleOutput | None] = asyncio.Queue()

    async def keystrokes() -> None:
        async for msg in requests:
            kind = msg.WhichOneof("kind")
            if kind == "data":
                stream.write(msg.data)
            elif kind == "resize":
                stream.resize(msg.resize.rows, msg.resize.cols)
        await out.put(None)  # the client closed its side

    async def states() -> None:
        last = None
        while (current := machines.records.get(uid)) is not None:
            if current.state != last:
                last = current.state
                await out.put(pb.ConsoleOutput(state=state_to_pb(current.state)))
            await asyncio.sleep(STATE_POLL_SECONDS)
        await out.put(None)  # deleted

    with stream.subscribe(history=first.attach.history) as output:

        async def serial() -> None:
            while True:
                await out.put(pb.ConsoleOutput(data=await output.get()))

        tasks = [asyncio.create_task(t()) for t in (keystrokes, states, serial)]
        try:
            while (msg := await out.get()) is not None:
                yield msg
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            bound.info("console detached")


async def serial_log(machines: Machines, request: pb.ConsoleLogRequest) -> AsyncIterator[bytes]:
    """The ConsoleLog stream: the log's tail, then (follow) what the VM prints next."""
    stream = _stream(machines, request.uid)
    with stream.subscribe(history=False) as output:
        # No await between subscribing and reading the file: nothing fed in between can
        # be missed or sent twice (feed writes the file and the queues in one step).
        head = _tail(stream.log_path, request.tail_lines)
        for i in range(0, len(head), LOG_CHUNK):
            yield head[i : i + LOG_CHUNK]
        while request.follow and request.uid in machines.records:
            with contextlib.suppress(TimeoutError):
                yield await asyncio.wait_for(output.get(), STATE_POLL_SECONDS)


def _tail(path: Path, lines: int) -> bytes:
    """The last ``lines`` lines of ``path`` (all of it, up to TAIL_SCAN_LIMIT, when < 0)."""
    if lines == 0:
        return b""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(0, end - TAIL_SCAN_LIMIT))
            data = f.read()
    except FileNotFoundError:
        return b""
    if lines < 0:
        return data
    # A final line without its newline counts as a line.
    cut = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(lines):
        cut = data.rfind(b"\n", 0, cut)
        if cut < 0:
            return data
    return data[cut + 1 :]
