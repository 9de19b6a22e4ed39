"""`make run` / `make down`: a local control plane, the controller and the examples.

Everything lives under .cache/ in the checkout; process ids go to .cache/pids so that
`make down` stops exactly what `make run` started.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from hack.controlplane import ControlPlane, free_port, guest_kernel_dir, virtiofsd_path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
PIDS = CACHE / "pids"
LOGS = CACHE / "logs"
KUBECONFIG = CACHE / "kubeconfig"
BIN = CACHE / "bin"


def say(message: str) -> None:
    print(f"[make run] {message}", flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _running() -> dict[str, int]:
    if not PIDS.is_dir():
        return {}
    found = {p.stem: int(p.read_text()) for p in PIDS.glob("*.pid")}
    return {name: pid for name, pid in found.items() if _alive(pid)}


def _spawn(name: str, argv: list[str], env: dict[str, str]) -> int:
    LOGS.mkdir(parents=True, exist_ok=True)
    with (LOGS / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    (PIDS / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


EXAMPLES = Path("/var/lib/zmachine-operator/examples")
NETNS = "zmrun"
BRIDGE_CIDR = "10.234.0.1/24"
AGENT_CIDR = "10.234.0.0/24"


def _example_flist() -> Path:
    """The busybox root filesystem that examples/busybox.yaml boots, packed as an rfs flist."""
    from controller.flist.pack import pack

    flist = EXAMPLES / "busybox.fl"
    if flist.exists():
        return flist
    say(f"packing the example flist {flist}")
    root = CACHE / "example-root"
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "etc", "root", "tmp", "proc", "sys", "dev"):
        (root / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    for applet in ("sh", "echo", "cat", "ls", "sleep", "ip", "ping", "hostname", "poweroff"):
        (root / "bin" / applet).symlink_to("busybox")
    EXAMPLES.mkdir(parents=True, exist_ok=True)
    pack(root, flist, [f"dir://{EXAMPLES / 'store'}"], progress=True)
    return flist


def _network() -> None:
    """Guests live on a bridge inside a namespace of their own, never on the host's."""
    if subprocess.run(["ip", "netns", "exec", NETNS, "true"], capture_output=True).returncode == 0:
        return
    subprocess.run(["ip", "netns", "add", NETNS], check=True)
    for cmd in (
        ["link", "add", "zmbr0", "type", "bridge"],
        ["addr", "add", BRIDGE_CIDR, "dev", "zmbr0"],
        ["link", "set", "zmbr0", "up"],
        ["link", "set", "lo", "up"],
    ):
        subprocess.run(["ip", "-n", NETNS, *cmd], check=True)


def _guest_kernel() -> Path:
    say("building the container-mode guest kernel and initramfs (cached)")
    return guest_kernel_dir()


def _pki() -> Path:
    pki = CACHE / "pki"
    if not (pki / "ca.crt").exists():
        from controller.agent.tls import write_dev_pki

        write_dev_pki(pki)
    return pki


def up() -> int:
    PIDS.mkdir(parents=True, exist_ok=True)
    if {"etcd", "kube-apiserver"} <= _running().keys() and KUBECONFIG.exists():
        say("control plane already running")
    else:
        down(quiet=True)
        PIDS.mkdir(parents=True, exist_ok=True)
        say("starting etcd and kube-apiserver on 127.0.0.1")
        plane = ControlPlane(CACHE / "cluster")
        plane.start()
        for name, pid in plane.pids().items():
            (PIDS / f"{name}.pid").write_text(str(pid))
        shutil.copyfile(plane.kubeconfig, KUBECONFIG)
    env = {**os.environ, "KUBECONFIG": str(KUBECONFIG)}
    BIN.mkdir(parents=True, exist_ok=True)
    (BIN / "kubectl").unlink(missing_ok=True)
    (BIN / "kubectl").symlink_to(_kubectl())
    kubectl = [str(_kubectl()), f"--kubeconfig={KUBECONFIG}"]
    say("installing the CRDs")
    subprocess.run([*kubectl, "apply", "--server-side", "-f", str(REPO / "crds")], check=True)
    subprocess.run(
        [*kubectl, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        [*kubectl, "create", "namespace", "zmachine-system"], capture_output=True, check=False
    )
    flist, guest, pki = _example_flist(), _guest_kernel(), _pki()
    _network()
    running = _running()
    if "agent" not in running:
        address = f"127.0.0.1:{free_port()}"
        say(f"starting the node agent on {address} (log: .cache/logs/agent.log)")
        _spawn("agent", [
            sys.executable, "-m", "controller.agent.main", "serve",
            "--listen", address, "--state-dir", str(CACHE / "agent"),
            "--node-name", "local", "--bridge", "zmbr0", "--netns", NETNS,
            "--cidr", AGENT_CIDR, "--guest-kernel-dir", str(guest),
            "--virtiofsd", str(virtiofsd_path()),
            "--flist-dir", str(flist.parent), "--metrics-port", str(free_port()),
            "--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / "server.crt"),
            "--tls-key", str(pki / "server.key"),
            "--kubeconfig", str(KUBECONFIG), "--lease-namespace", "zmachine-system",
        ], env)  # fmt: skip
    if "controller" not in running:
        say("starting the controller (log: .cache/logs/controller.log)")
        _spawn("controller", [
            sys.executable, "-m", "controller.operator.main", "--agent-tls-dir", str(pki),
            "--metrics-port", str(free_port()), "--health-port", str(free_port()),
        ], env)  # fmt: skip
    say("applying examples/")
    subprocess.run([*kubectl, "apply", "-f", str(REPO / "examples")], check=True)
    return _wait_running(kubectl)


def _wait_running(kubectl: list[str]) -> int:
    say("waiting for the examples to be Running and Ready (a TCG guest boots in ~15 s)")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        out = subprocess.run(
            [*kubectl, "get", "zm", "-o", "json"], capture_output=True, text=True, check=True
        ).stdout
        items = json.loads(out)["items"]
        phases = {i["metadata"]["name"]: (i.get("status") or {}).get("phase") for i in items}
        if any(p == "Failed" for p in phases.values()):
            say("a Zmachine failed; `kubectl describe zm` says why")
            return 1
        ready = {
            i["metadata"]["name"]: any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in (i.get("status") or {}).get("conditions", [])
            )
            for i in items
        }
        if items and all(ready.values()):
            ips = {i["metadata"]["name"]: i["status"].get("ip") for i in items}
            say("Running: " + ", ".join(f"{n} ({ips[n]})" for n in phases))
            print(f"""
Next:
  export KUBECONFIG={KUBECONFIG} PATH={BIN}:$PATH
  kubectl get zm              # phase, node, mode, IP
  kubectl describe zm hello   # conditions and events
  cat .cache/agent/vms/*/console.log        # the serial console of the guests
  ip netns exec {NETNS} busybox ping <IP>    # the guests' bridge lives in netns {NETNS}
  make down                   # delete the examples and stop everything
""")
            return 0
        time.sleep(1)
    say("the examples are not Running yet; see kubectl describe zm and .cache/logs/")
    return 1


@functools.cache
def _kubectl() -> Path:
    from hack.controlplane import kube_assets

    return kube_assets() / "kubectl"


def down(quiet: bool = False) -> int:
    running = _running()
    if {"controller", "agent", "kube-apiserver"} <= running.keys():
        say("deleting the Zmachines so the agent removes their VMs")
        subprocess.run(
            [
                str(_kubectl()),
                f"--kubeconfig={KUBECONFIG}",
                "delete",
                "zm",
                "--all",
                "--all-namespaces",
                "--wait=true",
                "--timeout=120s",
            ],
            check=False,
        )
    for name, pid in running.items():
        if not quiet:
            say(f"stopping {name} ({pid})")
        os.killpg(pid, signal.SIGTERM) if _is_group_leader(pid) else os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(p) for p in running.values()):
        time.sleep(0.2)
    for pid in running.values():
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(PIDS, ignore_errors=True)
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)
    shutil.rmtree(CACHE / "cluster", ignore_errors=True)
    KUBECONFIG.unlink(missing_ok=True)
    return 0


def _is_group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["up", "down"])
    args = parser.parse_args()
    return up() if args.action == "up" else down()


if __name__ == "__main__":
    sys.exit(main())
