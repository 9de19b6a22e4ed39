"""Host cost of idle VMs on one node, real QEMU (TCG) and virtiofsd, guest RAM excluded.

Run as root: ``.venv/bin/python -m tests.bench.host_overhead --vms 1 10 30 --write``. One agent,
N busybox container-mode VMs (1 vCPU, 256 MiB) booted to their entrypoint, then left idle.
Memory per process is RssAnon + RssFile: guest RAM is a shared memfd (RssShmem) in QEMU and
in the virtiofsd that map it, so it is left out. Counted: QEMU, virtiofsd, the flist mounts
and the agent's growth over its idle size. CPU is measured over 30 s of rest.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.rpc.tls import write_dev_pki
from controller.flist.pack import pack
from hack.controlplane import guest_kernel_dir
from tests.agent.conftest import agent_process, guest_busybox_root
from tests.bench.report import write_section
from tests.bench.scale import in_private_mounts
from tests.netns import bridged_netns

ENTRY = "/bin/sh -c 'echo bench-entry; while :; do sleep 3600; done'"
KINDS = {
    "qemu-system": "QEMU",
    "virtiofsd": "virtiofsd",
    "controller.flist.cli mount": "flist mount",
}


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0])  # KiB
    return out


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _processes(state: Path) -> dict[int, str]:
    """Processes working for the agent's VMs (their command line names its state dir)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(argv).decode(errors="replace")
        if str(state) not in text:
            continue
        kind = next((k for marker, k in KINDS.items() if marker in text), None)
        if kind is not None:
            found[int(entry.name)] = kind
    return found


def measure(base: Path, vms: int) -> dict[str, float]:
    write_dev_pki(base / "pki")
    flist = base / "busybox.fl"
    pack(guest_busybox_root(base / "root"), flist, [f"dir://{base / 'store'}"])
    with bridged_netns("zmhov", "zmbr0", "10.231.0.1/24") as netns:
        agent = agent_process(base / "state", base / "pki", netns, guest_kernel_dir(), base)
        with agent.running():
            assert agent.proc is not None
            idle_agent = _status(agent.proc.pid)
            logs = []
            for i in range(vms):
                ref = pb.ZmachineRef(namespace="bench", name=f"vm-{i}", uid=f"hov-{i}")
                spec = pb.ZmachineSpec(
                    flist=f"file://{flist}", cpu=1, memory_bytes=256 << 20, entrypoint=ENTRY
                )
                resp = agent.deploy_settled(ref, 1, spec, timeout=600)
                logs.append(Path(resp.machine.console_log))
            deadline = time.monotonic() + 900
            while not all(
                p.exists() and "bench-entry" in p.read_text(errors="replace") for p in logs
            ):
                assert time.monotonic() < deadline, "guests did not boot"
                time.sleep(1)
            time.sleep(20)  # settle after boot
            procs = _processes(base / "state")
            cpu0 = {pid: _cpu(pid) for pid in procs}
            agent_cpu0 = _cpu(agent.proc.pid)
            time.sleep(30)
            cpu = sum(_cpu(pid) - cpu0[pid] for pid in procs if Path(f"/proc/{pid}").exists())
            cpu += _cpu(agent.proc.pid) - agent_cpu0
            by_kind: dict[str, float] = {}
            for pid, kind in procs.items():
                s = _status(pid)
                by_kind[kind] = by_kind.get(kind, 0.0) + (s["RssAnon"] + s["RssFile"]) / 1024
            grown = _status(agent.proc.pid)
            agent_growth = (
                grown["RssAnon"] + grown["RssFile"] - idle_agent["RssAnon"] - idle_agent["RssFile"]
            ) / 1024
    total = sum(by_kind.values()) + agent_growth
    return {
        "vms": vms,
        "per_vm_mib": total / vms,
        "qemu_mib": by_kind.get("QEMU", 0.0) / vms,
        "virtiofsd_mib": by_kind.get("virtiofsd", 0.0) / vms,
        "flist_mib": by_kind.get("flist mount", 0.0) / vms,
        "agent_mib": agent_growth / vms,
        "cpu_percent_per_vm": cpu / 30 * 100 / vms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vms", type=int, nargs="+", default=[1, 10, 30])
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    in_private_mounts(["tests.bench.host_overhead"], sys.argv[1:])
    rows = []
    for n in args.vms:
        with tempfile.TemporaryDirectory(prefix="zm-hov-") as tmp:
            f = measure(Path(tmp), n)
        row = (
            f"| {n} | {f['per_vm_mib']:.1f} MiB | {f['qemu_mib']:.1f} | {f['virtiofsd_mib']:.1f} "
            f"| {f['flist_mib']:.1f} | {f['agent_mib']:.1f} | {f['cpu_percent_per_vm']:.2f} % |"
        )
        print(row, flush=True)
        rows.append(row)
    text = f"""## Host overhead per idle VM

Command (as root): `.venv/bin/python -m tests.bench.host_overhead --vms \
{" ".join(map(str, args.vms))} --write`. One agent, busybox container-mode VMs (1 vCPU,
256 MiB, QEMU under TCG with a 64 MiB translation cache) booted to their entrypoint and left
idle, on the 2-core dev machine shared with other work. Memory is RssAnon + RssFile (guest
RAM, a shared memfd, is excluded); CPU over 30 s at rest.

| VMs | host memory per VM | QEMU | virtiofsd | flist mount | agent | CPU per VM |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    print(text)
    if args.write:
        write_section("Host overhead per idle VM", text)


if __name__ == "__main__":
    main()
