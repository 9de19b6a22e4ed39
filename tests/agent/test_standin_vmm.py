"""The stand-in VMM (tests/bench/standin_vmm.c): on its own, as cloud-hypervisor's API
describes it, and under a real agent (container mode: real FUSE flist mount, overlay,
virtiofsd and tap; the stand-in is the only part that is not real)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.agent.hypervisor.ch_api import CloudHypervisorAPI, CloudHypervisorAPIError
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.runtime.procs import cmdline
from hack.controlplane import standin_vmm_path
from tests.agent.agent_harness import AgentProcess
from tests.agent.conftest import standin_agent_process
from tests.agent.test_agent_vm import wait_for
from tests.faults.invariants import leaks

pytestmark = pytest.mark.timeout(120)

UID = "5a1d0c3e-standin-vmm-test"
REF = pb.ZmachineRef(namespace="default", name="standin", uid=UID)


def start_standin(tmp: Path, *more: str) -> subprocess.Popen[bytes]:
    (tmp / "vmlinuz").write_text("k")
    (tmp / "initramfs.img").write_text("i")
    (tmp / "disk.img").write_text("")
    argv = [
        str(standin_vmm_path()), "--api-socket", f"path={tmp / 'api.sock'}",
        "--kernel", str(tmp / "vmlinuz"), "--initramfs", str(tmp / "initramfs.img"),
        "--cmdline", "console=ttyS0", "--cpus", "boot=2", "--memory", "size=256M,shared=on",
        "--fs", f"tag=vroot,socket={tmp / 'fs.sock'},id=fs0",
        "--disk", f"path={tmp / 'disk.img'},readonly=off,id=disk0",
        "--net", "tap=zmtest0,mac=02:00:00:00:00:01,id=net0", "--console", "off", *more,
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    wait_for("the API socket", lambda: (tmp / "api.sock").exists(), timeout=10)
    return proc


def raw_request(sock: Path, request: bytes) -> bytes:
    """One HTTP exchange, byte for byte (the header block is what is checked)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data


def test_api_pty_events_and_exit_as_cloud_hypervisor(tmp_path: Path) -> None:
    events = tmp_path / "events.json"
    started = time.monotonic()
    proc = start_standin(tmp_path, "--serial", "pty", "--event-monitor", f"path={events}")
    startup = time.monotonic() - started
    try:
        api = CloudHypervisorAPI(tmp_path / "api.sock")
        assert asyncio.run(api.ping())["pid"] == proc.pid
        info = asyncio.run(api.info())
        assert info["state"] == "Running"
        assert info["config"]["disks"][0]["id"] == "disk0"
        assert info["config"]["net"][0]["tap"] == "zmtest0"
        assert info["config"]["memory"] == {"size": 256 << 20, "shared": True, "hugepages": False}
        pty = info["config"]["serial"]["file"]
        assert info["config"]["serial"]["mode"] == "Pty" and pty.startswith("/dev/pts/")
        asyncio.run(api.request("PUT", "vm.reboot"))
        assert asyncio.run(api.info())["config"]["serial"]["file"] != pty  # new pty, as v40+
        assert set(asyncio.run(api.counters())) == {"disk0", "net0"}

        asyncio.run(api.pause())
        assert asyncio.run(api.info())["state"] == "Paused"
        with pytest.raises(CloudHypervisorAPIError) as refused:
            asyncio.run(api.pause())
        assert refused.value.status == 500
        asyncio.run(api.resume())
        assert asyncio.run(api.info())["state"] == "Running"

        reply = raw_request(tmp_path / "api.sock", b"PUT /api/v1/vm.pause HTTP/1.1\r\n\r\n")
        head = reply.split(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 204") and b"content-length" not in head
        wrong_verb = raw_request(tmp_path / "api.sock", b"GET /api/v1/vm.resume HTTP/1.1\r\n\r\n")
        assert wrong_verb.startswith(b"HTTP/1.1 400")

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        proc.kill()
        proc.wait()
    names = [f"{e['source']}/{e['event']}" for e in _json_stream(events.read_text())]
    assert names == [
        "vmm/starting", "vm/booting", "vm/booted", "vm/rebooting", "vm/rebooted",
        "vm/pausing", "vm/paused", "vm/resuming", "vm/resumed",
        "vm/pausing", "vm/paused", "vmm/shutdown",
    ]  # fmt: skip
    assert startup < 5, f"the stand-in took {startup:.2f}s to create its API socket"


def _json_stream(text: str) -> list[dict[str, object]]:
    decoder, pos, out = json.JSONDecoder(), 0, []
    while pos < len(text.rstrip()):
        obj, end = decoder.raw_decode(text, pos)
        out.append(obj)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def test_pty_carries_the_console_and_a_power_off_exits_0(tmp_path: Path) -> None:
    proc = start_standin(tmp_path, "--serial", "pty")
    try:
        api = CloudHypervisorAPI(tmp_path / "api.sock")
        pty = asyncio.run(api.info())["config"]["serial"]["file"]
        fd = os.open(pty, os.O_RDONLY | os.O_NOCTTY)
        chunks: list[bytes] = []

        def read_console() -> None:
            # Reading before the power-off: once the stand-in exits, its side of the PTY is
            # gone and what nobody read yet is lost (EIO), as with cloud-hypervisor.
            while b"reboot: Power down" not in b"".join(chunks):
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    return
                if not chunk:
                    return
                chunks.append(chunk)

        reader = threading.Thread(target=read_console, daemon=True)
        reader.start()
        try:
            asyncio.run(api.power_button())  # the "guest" powers off and says so on its console
            reader.join(10)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        assert b"reboot: Power down" in data
        assert b"stand-in for cloud-hypervisor" in data
        assert proc.wait(5) == 0
    finally:
        proc.kill()
        proc.wait()


def test_vmm_shutdown_answers_then_exits_0(tmp_path: Path) -> None:
    proc = start_standin(tmp_path, "--serial", f"file={tmp_path / 'console.log'}")
    try:
        asyncio.run(CloudHypervisorAPI(tmp_path / "api.sock").vmm_shutdown())
        assert proc.wait(5) == 0
    finally:
        proc.kill()
        proc.wait()
    assert "zm-init: switching root" in (tmp_path / "console.log").read_text()


def test_one_connection_carries_several_requests_and_the_standin_stays_small(
    tmp_path: Path,
) -> None:
    """Keep-alive as CH's micro_http: requests in order on one connection, one split across
    two sends with a body, two in one send; the connection ends when the client says so."""
    proc = start_standin(tmp_path, "--serial", "null")
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(tmp_path / "api.sock"))
            s.sendall(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
            head, _, body = _read_until(s, b"}").partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["pid"] == proc.pid
            s.sendall(b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{")
            time.sleep(0.2)  # the body's second half comes later: nothing is answered yet
            s.sendall(
                b"}GET /api/v1/nothing HTTP/1.1\r\n\r\n"
                b"GET /api/v1/vm.info HTTP/1.1\r\nconnection: Close\r\n\r\n"
            )
            rest = _read_until(s, b"")  # the stand-in closes after the third reply
        replies = rest.split(b"HTTP/1.1 ")[1:]
        assert [r[:3] for r in replies] == [b"204", b"404", b"200"], rest
        assert b"content-length" not in replies[0].lower()
        assert b"\r\nContent-Length: 0\r\n" in replies[1]
        assert b"\r\nConnection: close\r\n" in replies[2]
        assert json.loads(replies[2].split(b"\r\n\r\n", 1)[1])["state"] == "Paused"
        # What makes thousands of stand-in VMs fit one host (the scale benchmark): the
        # memory each holds alone (its binary's text is shared between them).
        rollup = Path(f"/proc/{proc.pid}/smaps_rollup").read_text().splitlines()
        dirty = next(int(line.split()[1]) for line in rollup if line.startswith("Private_Dirty:"))
        assert dirty < 1024, f"one stand-in holds {dirty} KiB of private dirty memory"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(5) == 0
    finally:
        proc.kill()
        proc.wait()


def _read_until(s: socket.socket, end: bytes) -> bytes:
    """What the peer sends until ``end`` (b"": until it closes)."""
    data = b""
    while not (end and data.endswith(end)):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_api_socket_and_event_monitor_handed_over_as_fds(tmp_path: Path) -> None:
    """``--api-socket fd=N`` (bound and listening) and ``--event-monitor fd=N`` (a pipe)."""
    (tmp_path / "vmlinuz").write_text("k")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "api.sock"))
    listener.listen()
    events_r, events_w = os.pipe()
    argv = [
        str(standin_vmm_path()), "--api-socket", f"fd={listener.fileno()}",
        "--event-monitor", f"fd={events_w}", "--kernel", str(tmp_path / "vmlinuz"),
        "--serial", "null",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=(listener.fileno(), events_w))
    listener.close()
    os.close(events_w)
    try:
        api = CloudHypervisorAPI(tmp_path / "api.sock")
        assert asyncio.run(api.info())["config"]["payload"] == {"kernel": str(tmp_path / "vmlinuz")}
        asyncio.run(api.vmm_shutdown())
        assert proc.wait(5) == 0
        with os.fdopen(events_r, "rb") as pipe:
            text = pipe.read().decode()  # EOF: the stand-in held the only write end
    finally:
        proc.kill()
        proc.wait()
    names = [f"{e['source']}/{e['event']}" for e in _json_stream(text)]
    assert names == ["vmm/starting", "vm/booting", "vm/booted", "vmm/shutdown"]


def test_a_missing_disk_fails_the_start_like_cloud_hypervisor(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(standin_vmm_path()), "--api-socket", str(tmp_path / "api.sock"),
         "--kernel", str(tmp_path / "none"), "--serial", "null"],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert out.returncode == 1 and "cannot open" in out.stderr


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory,
    agent_pki: Path,
    agent_standin_guest_dir: Path,
    agent_netns: str,
    agent_busybox_flist: Path,
) -> Iterator[AgentProcess]:
    state = tmp_path_factory.mktemp("standin") / "state"
    proc = standin_agent_process(
        state, agent_pki, agent_netns, agent_standin_guest_dir, agent_busybox_flist.parent
    )
    with proc.running():
        yield proc


SHARE = "shared" + "-x" * 15  # the longest volume name: its socket must still fit


def standin_spec(
    flist: Path, policy: pb.RestartPolicy.ValueType = pb.RESTART_POLICY_ALWAYS
) -> pb.ZmachineSpec:
    return pb.ZmachineSpec(
        flist=f"file://{flist}",
        cpu=1,
        memory_bytes=256 << 20,
        interfaces=[pb.NetworkInterface(network="lan")],
        volumes=[
            pb.Volume(name="data", kind=pb.VOLUME_KIND_DISK, size_bytes=16 << 20),
            pb.Volume(name=SHARE, kind=pb.VOLUME_KIND_SHARE),
        ],
        mounts=[
            pb.Mount(name="data", mountpoint="/data"),
            pb.Mount(name=SHARE, mountpoint="/srv"),
        ],
        restart_policy=policy,
    )


@pytest.mark.fuse
def test_agent_runs_a_machine_on_the_standin(
    agent: AgentProcess, agent_busybox_flist: Path, agent_netns: str
) -> None:
    agent.call("deploy", REF, 1, standin_spec(agent_busybox_flist))
    m = wait_for("Running", lambda: in_state(agent, UID, pb.MACHINE_STATE_RUNNING), timeout=60)
    assert m.hypervisor == "cloud-hypervisor"
    argv = cmdline(m.pid)
    assert argv[0] == str(standin_vmm_path()) and "--api-socket" in argv, argv
    # virtiofsd runs for the root and the share; the stand-in leaves them waiting.
    # (The Rust virtiofsd sandboxes itself in a child process: count sockets, not pids.)
    sockets = {
        a[a.index("--socket-path") + 1] for a in _processes_naming(UID) if "--socket-path" in a
    }
    assert {Path(s).name for s in sockets} == {"vfs-root.sock", "vfs-0.sock"}, sockets
    wait_for("the boot duration", lambda: get(agent, UID).boot_duration_seconds > 0, 30)

    paused = agent.call("pause", UID)
    assert isinstance(paused, pb.Machine) and paused.state == pb.MACHINE_STATE_PAUSED
    sock = agent.state_dir / "vms" / UID / "run" / "vmm.sock"
    assert asyncio.run(CloudHypervisorAPI(sock).info())["state"] == "Paused"
    resumed = agent.call("resume", UID)
    assert isinstance(resumed, pb.Machine) and resumed.state == pb.MACHINE_STATE_RUNNING
    assert asyncio.run(CloudHypervisorAPI(sock).info())["state"] == "Running"
    stats = agent.call("stats", UID)
    assert isinstance(stats, pb.MachineStats) and stats.vmm_rss_bytes > 0

    assert agent.call("delete", UID) is True
    assert leaks([agent.state_dir], agent_netns) == []


def get(agent: AgentProcess, uid: str) -> pb.Machine:
    m = agent.call("get", uid)
    assert isinstance(m, pb.Machine)
    return m


def in_state(agent: AgentProcess, uid: str, state: pb.MachineState.ValueType) -> pb.Machine | None:
    m = get(agent, uid)
    return m if m.state == state else None


def _processes_naming(uid: str) -> list[list[str]]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            argv = cmdline(int(entry.name))
            if any(uid in a for a in argv):
                found.append(argv)
    return found


def _flist_servers(agent: AgentProcess) -> list[int]:
    """Live FUSE flist servers under the agent's state dir."""
    return [
        int(e.name)
        for e in os.scandir("/proc")
        if e.name.isdigit()
        and (argv := cmdline(int(e.name)))
        and "controller.flist.cli" in argv
        and any(str(agent.state_dir) in a for a in argv)
    ]


def _all_running(agent: AgentProcess, uids: list[str]) -> None:
    def running() -> bool:
        return all(in_state(agent, uid, pb.MACHINE_STATE_RUNNING) for uid in uids)

    wait_for("Running", running, 60)


@pytest.mark.fuse
def test_machines_from_one_flist_share_one_mount_through_an_agent_crash(
    agent: AgentProcess, agent_busybox_flist: Path, agent_netns: str
) -> None:
    uids = [f"{UID}-{i}" for i in range(3)]
    spec = pb.ZmachineSpec(flist=f"file://{agent_busybox_flist}", cpu=1, memory_bytes=256 << 20)
    for uid in uids:
        agent.call("deploy", pb.ZmachineRef(namespace="default", name=uid, uid=uid), 1, spec)
    _all_running(agent, uids)
    servers = _flist_servers(agent)
    assert len(servers) == 1, servers

    agent.kill()  # its records name the mount: the next agent reuses it
    agent.start()
    _all_running(agent, uids)
    assert _flist_servers(agent) == servers

    for uid in uids[:-1]:
        assert agent.call("delete", uid) is True
    assert _flist_servers(agent) == servers, "the last machine still uses it"
    assert agent.call("delete", uids[-1]) is True
    assert _flist_servers(agent) == []
    assert leaks([agent.state_dir], agent_netns) == []
