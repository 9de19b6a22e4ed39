"""What the agent adds around a guest boot: Deploy, no-op Deploy, adoption after an agent
SIGKILL, and Delete, measured through its real gRPC API (mTLS, QEMU under TCG).

Run as root: ``.venv/bin/python -m tests.bench.agent_lifecycle --runs 3``. Prints the medians
as a Markdown table for docs/benchmarks.md ("Agent").
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.rpc.tls import write_dev_pki
from controller.flist.pack import pack
from hack.controlplane import guest_kernel_dir
from tests.agent.agent_harness import AgentProcess
from tests.agent.conftest import agent_process, guest_busybox_root
from tests.bench.report import write_section

REPO = Path(__file__).resolve().parents[2]
ENTRY = "/bin/sh -c 'echo bench-entry; while :; do sleep 3600; done'"


def timed(fn: Callable[..., object], *args: object) -> float:
    start = time.monotonic()
    fn(*args)
    return time.monotonic() - start


def one_run(agent: AgentProcess, flist: Path, i: int) -> dict[str, float]:
    uid = f"bench-{i}"
    ref = pb.ZmachineRef(namespace="bench", name=uid, uid=uid)
    spec = pb.ZmachineSpec(flist=f"file://{flist}", cpu=1, memory_bytes=256 << 20, entrypoint=ENTRY)
    start = time.monotonic()
    machine = agent.deploy_settled(ref, 1, spec)
    out = {
        "Deploy to Running (flist mount, overlay, seed, virtiofsd, VMM up)": time.monotonic()
        - start
    }
    out["identical Deploy (no-op)"] = timed(agent.call, "deploy", ref, 1, spec)
    console = Path(machine.machine.console_log)
    while "bench-entry" not in (console.read_text(errors="replace") if console.exists() else ""):
        time.sleep(0.05)
    out["Deploy call to entrypoint output (TCG boot)"] = time.monotonic() - start
    agent.kill()
    out["agent restart to serving, VM adopted"] = timed(agent.start)
    got = agent.call("get", uid)
    assert isinstance(got, pb.Machine) and got.pid == machine.machine.pid
    out["Delete (power button ignored: 2 s grace, quit, cleanup)"] = timed(
        agent.call, "delete", uid
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    guest = guest_kernel_dir()
    with tempfile.TemporaryDirectory(prefix="zm-bench-agent-") as tmp:
        base = Path(tmp)
        write_dev_pki(base / "pki")
        flist = base / "busybox.fl"
        pack(guest_busybox_root(base / "root"), flist, [f"dir://{base / 'store'}"])
        agent = agent_process(base / "state", base / "pki", None, guest, base)
        with agent.running():
            runs = [one_run(agent, flist, i) for i in range(args.runs)]
    for i, r in enumerate(runs, 1):
        print(f"run {i}: " + ", ".join(f"{v:.3f}s" for v in r.values()))
    rows = []
    for key in runs[0]:
        value = statistics.median(r[key] for r in runs)
        rows.append(
            f"| {key} | {value * 1000:.0f} ms |" if value < 1 else f"| {key} | {value:.2f} s |"
        )
    text = SECTION.format(runs=args.runs, table="\n".join(rows))
    print(text)
    if args.write:
        write_section("Agent", text)


SECTION = """## Agent

Command (as root): `.venv/bin/python -m tests.bench.agent_lifecycle --runs {runs} --write`.
Medians of {runs} Deploy → boot → agent SIGKILL + restart → Delete cycles of a busybox
container-mode VM (1 vCPU, 256 MiB, QEMU under TCG) through the agent's gRPC API with mTLS, on
the 2-core dev machine shared with other work.

| what | median |
|---|---|
{table}

Deploy answers at once (Provisioning) and provisions in the background; "Deploy to Running"
is until Get reports the VMM's control socket answering; the guest boot (see "Guest boot")
follows. Delete waits 2 s for the guest to honour the ACPI power button, which a busybox
guest ignores.
"""


if __name__ == "__main__":
    main()
