"""Container-mode guest boot time under QEMU (TCG unless ZM_ACCEL=kvm and KVM works).

Run as root: ``.venv/bin/python -m tests.bench.guest_boot --runs 3 [--write]``.
Measures, from the moment virtiofsd is asked to start: virtiofsd ready, QEMU's QMP socket
answering, our /init's first line on the serial console (kernel boot done) and the
entrypoint's output (initramfs done), then the time ``stop`` takes for a guest that ignores
the power button. ``--write`` puts the medians into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from controller.agent.guest.seed import SeedConfig, write_seed
from controller.agent.guest.virtiofs import find_virtiofsd, start_virtiofsd
from controller.agent.guest.vmconfig import BootMode, Disk, FsShare, VMConfig, kernel_cmdline
from controller.agent.hypervisor import Qemu
from controller.agent.runtime.procs import terminate
from hack.controlplane import guest_kernel_dir, virtiofsd_path
from tests.agent.conftest import guest_busybox_root
from tests.bench.report import write_section

REPO = Path(__file__).resolve().parents[2]
SECTION = "## Guest boot"


def has_line(path: Path, prefix: str) -> bool:
    text = path.read_text(errors="replace") if path.exists() else ""
    return any(line.startswith(prefix) for line in text.splitlines())


async def until_line(path: Path, prefix: str, within: float = 180.0) -> float:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if has_line(path, prefix):
            return time.monotonic()
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{prefix!r} not in {path} within {within}s")


async def one_boot(tmp: Path, guest: Path, accel: str) -> dict[str, float]:
    root = guest_busybox_root(tmp / "root")
    seed = write_seed(
        SeedConfig("bench", "bench", entrypoint="/bin/sh -c 'echo bench-entry; sleep 600'"),
        tmp / "seed.img",
    )
    share = FsShare("vroot", tmp / "fs.sock", root)
    cfg = VMConfig(
        vm_id=tmp.name,
        cpus=1,
        memory_mib=256,
        kernel=guest / "vmlinuz",
        initrd=guest / "initramfs.img",
        cmdline=kernel_cmdline(BootMode.CONTAINER),
        shares=[share],
        disks=[Disk(seed, readonly=True)],
        nics=[],
        serial_log=tmp / "serial.log",
        api_socket=tmp / "qmp.sock",
        state_dir=tmp / "state",
    )
    daemon = find_virtiofsd(virtiofsd_path())
    t0 = time.monotonic()
    fsd = await start_virtiofsd(share, tmp / "virtiofsd.log", daemon=daemon)
    t_fs = time.monotonic()
    vm = await Qemu(accel=accel).start(cfg)
    t_vmm = time.monotonic()
    try:
        t_init = await until_line(cfg.serial_log, "zm-init: starting")
        t_entry = await until_line(cfg.serial_log, "bench-entry")
        t_stop = time.monotonic()
        await vm.stop(grace=1.0, hard_grace=10.0)
        stopped = time.monotonic()
    finally:
        await terminate(vm.ref, grace=2)
        await terminate(fsd, grace=2)
    return {
        "virtiofsd ready": t_fs - t0,
        "QEMU control socket answering": t_vmm - t0,
        "/init running (kernel booted)": t_init - t0,
        "entrypoint output": t_entry - t0,
        "stop (power button ignored, 1 s grace, then quit)": stopped - t_stop,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    guest = guest_kernel_dir()
    accel = Qemu().acceleration() if os.environ.get("ZM_ACCEL") else "tcg"
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="zm-bench-boot-") as tmp:
            runs.append(asyncio.run(one_boot(Path(tmp), guest, accel)))
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f}s" for k, v in runs[-1].items()))
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    rows = "\n".join(f"| {k} | {v:.2f} s |" for k, v in medians.items())
    section = (
        f"{SECTION}\n\nCommand (as root): `.venv/bin/python -m tests.bench.guest_boot --runs "
        f"{args.runs} --write`. Medians of {args.runs} container-mode boots (1 vCPU, 256 MiB, "
        f"accel {accel}, busybox root over virtio-fs, our Debian kernel + initramfs) on the "
        "2-core dev machine, shared with other work. Times from asking virtiofsd to start.\n\n"
        f"| what | median |\n|---|---|\n{rows}\n"
    )
    print(section)
    if args.write:
        write_section(SECTION.removeprefix("## "), section)


if __name__ == "__main__":
    main()
