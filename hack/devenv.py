"""`make run` / `make down`: a local control plane, the controller and the examples.

Everything lives under .cache/ in the checkout (ZMACHINE_DEV_DIR elsewhere, and the guests'
namespace is ZMACHINE_DEV_NETNS, default zmrun: tests run a second copy beside a user's).
Each process is recorded in .cache/pids with its kernel start time and a marker of its
command line, so a pid that died, or was reused by another program, is never taken for
ours. `make down` removes everything `make run` made, whatever state it is in: the agent's
machines are torn down offline (`zmachine-agent cleanup`) after every process has stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from controller.agent.runtime.procs import ProcessRef
from hack.consoleapi import ConsoleServer
from hack.controlplane import (
    ControlPlane,
    free_port,
    guest_kernel_dir,
    virtiofsd_path,
    wireguard_go_path,
)

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ZMACHINE_DEV_DIR") or REPO / ".cache").resolve()
PIDS = CACHE / "pids"
LOGS = CACHE / "logs"
KUBECONFIG = CACHE / "kubeconfig"
BIN = CACHE / "bin"


def say(message: str) -> None:
    print(f"[make run] {message}", flush=True)


# What must appear in each component's command line (with its start time, the identity).
MARKERS = {
    "etcd": "etcd",
    "kube-apiserver": "kube-apiserver",
    "agent": "controller.agent.main",
    "controller": "controller.operator.main",
    "console": "controller.console.server",
}


def record(name: str, pid: int) -> None:
    PIDS.mkdir(parents=True, exist_ok=True)
    ref = ProcessRef.of(pid, MARKERS[name])
    (PIDS / f"{name}.pid").write_text(json.dumps(dataclasses.asdict(ref)))


def running() -> dict[str, ProcessRef]:
    """The recorded components that are still the processes we started."""
    found = {}
    for path in PIDS.glob("*.pid") if PIDS.is_dir() else ():
        try:
            ref = ProcessRef(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # a pid file of an older `make run`, or half written: not ours
        if ref.alive():
            found[path.stem] = ref
    return found


def _spawn(name: str, argv: list[str], env: dict[str, str]) -> int:
    LOGS.mkdir(parents=True, exist_ok=True)
    with (LOGS / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    record(name, proc.pid)
    return proc.pid


EXAMPLES = Path("/var/lib/zmachine-operator/examples")
NETNS = os.environ.get("ZMACHINE_DEV_NETNS") or "zmrun"
AGENT_STATE = CACHE / "agent"
AGENT_FLAGS = CACHE / "agent-flags.json"
AGENT_MAIN = [sys.executable, "-m", "controller.agent.main"]
BRIDGE_CIDR = "10.235.0.1/24"
AGENT_CIDR = "10.235.0.0/24"  # the agent's node-local bridge, unused by the examples
NODE_NAME = "local"


def example_flist(directory: Path = EXAMPLES) -> Path:
    """The busybox root filesystem that examples/busybox.yaml boots, packed as an rfs flist
    (with its store) into `directory`."""
    from controller.flist.pack import pack

    flist = directory / "busybox.fl"
    if flist.exists():
        return flist
    say(f"packing the example flist {flist}")
    root = directory / "example-root"
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "etc", "root", "tmp", "proc", "sys", "dev"):
        (root / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    for applet in ("sh", "echo", "cat", "ls", "sleep", "ip", "ping", "hostname", "poweroff"):
        (root / "bin" / applet).symlink_to("busybox")
    pack(root, flist, [f"dir://{directory / 'store'}"], progress=True)
    shutil.rmtree(root)
    return flist


def network() -> None:
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


def dev_pki() -> Path:
    pki = CACHE / "pki"
    if not (pki / "ca.crt").exists():
        from controller.agent.rpc.tls import write_dev_pki

        write_dev_pki(pki)
    return pki


def up() -> int:
    if {"etcd", "kube-apiserver"} <= running().keys() and KUBECONFIG.exists():
        say("control plane already running")
    else:
        # A new control plane has none of the old Zmachines: `down` also removes the VMs
        # the agent kept for them, so the agent starts from an empty state dir.
        down(quiet=True)
        say("starting etcd and kube-apiserver on 127.0.0.1")
        plane = ControlPlane(CACHE / "cluster")
        plane.start()
        for name, pid in plane.pids().items():
            record(name, pid)
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
    flist, guest, pki = example_flist(), _guest_kernel(), dev_pki()
    network()
    alive = running()
    if "agent" not in alive:
        address = start_agent(guest, flist.parent, pki, env)
        say(f"started the node agent on {address} (log: {LOGS}/agent.log)")
    if "controller" not in alive:
        say("starting the controller (log: .cache/logs/controller.log)")
        _spawn("controller", [
            sys.executable, "-m", "controller.operator.main", "--agent-tls-dir", str(pki),
            "--metrics-port", str(free_port()), "--health-port", str(free_port()),
        ], env)  # fmt: skip
    if "console" not in alive:
        say("starting the console server, an aggregated API (log: .cache/logs/console.log)")
        console = ConsoleServer(ControlPlane(CACHE / "cluster"), CACHE, pki)
        _spawn("console", console.argv(), env)
        console.publish()
    # `kubectl zmachine ...` finds the plugin next to kubectl.
    (BIN / "kubectl-zmachine").unlink(missing_ok=True)
    (BIN / "kubectl-zmachine").symlink_to(Path(sys.executable).parent / "kubectl-zmachine")
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
            say("Running: " + ", ".join(phases))
            for item in items:
                say(f"  {item['metadata']['name']}: {_addresses(item['status'])}")
            print(f"""
Next:
  export KUBECONFIG={KUBECONFIG} PATH={BIN}:$PATH
  kubectl get zm -o wide      # phase, node, mode and every address
  kubectl get zmnet           # networks: range, IPv6 prefix, machines
  kubectl describe zm hello   # conditions and events
  kubectl zmachine console hello            # its serial console (leave with Ctrl-])
  kubectl zmachine open hello --browser     # the same in a browser page
  kubectl zmachine logs hello -f            # the serial log
  {_router_hint(kubectl)}
  make down                   # delete the examples and stop everything
""")
            return 0
        time.sleep(1)
    say("the examples are not Running yet; see kubectl describe zm and .cache/logs/")
    return 1


ADDRESS_FIELDS = (
    ("ip", "IPv4"), ("ipv6", "IPv6"), ("publicIP", "public"), ("planetaryIP", "planetary"),
    ("myceliumIP", "mycelium"),
)  # fmt: skip


def _addresses(status: dict[str, Any]) -> str:
    found = [f"{label} {status[key]}" for key, label in ADDRESS_FIELDS if status.get(key)]
    return ", ".join(found) or "no address"


def _router_hint(kubectl: list[str]) -> str:
    """How to reach the example network's guests: from its router namespace on the node."""
    from controller.agent.network.private import short_id

    out = subprocess.run(
        [*kubectl, "get", "zmnet", "zmnet", "-o", "jsonpath={.metadata.uid}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    router = f"zn-{short_id(NODE_NAME, out.stdout.strip())}"
    return f"ip netns exec {router} busybox ping <IP>   # network zmnet's router on this node"


def start_agent(guest: Path, flists: Path, pki: Path, env: dict[str, str]) -> str:
    """The node agent on a free loopback port; its address."""
    address = f"127.0.0.1:{free_port()}"
    flags = _agent_flags(address, guest, flists, pki)
    # `make down` tears the machines down with exactly these flags, even with no agent.
    AGENT_FLAGS.parent.mkdir(parents=True, exist_ok=True)
    AGENT_FLAGS.write_text(json.dumps(flags))
    _spawn("agent", [*AGENT_MAIN, "serve", *flags], env)
    return address


def _agent_flags(address: str, guest: Path, flists: Path, pki: Path) -> list[str]:
    return [
        "--listen", address, "--state-dir", str(AGENT_STATE),
        "--node-name", NODE_NAME, "--bridge", "zmbr0", "--netns", NETNS,
        "--cidr", AGENT_CIDR, "--guest-kernel-dir", str(guest),
        "--virtiofsd", str(virtiofsd_path()), "--wireguard-go", str(wireguard_go_path()),
        "--flist-dir", str(flists), "--metrics-port", str(free_port()),
        "--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / "server.crt"),
        "--tls-key", str(pki / "server.key"),
        "--kubeconfig", str(KUBECONFIG), "--lease-namespace", "zmachine-system",
    ]  # fmt: skip


@functools.cache
def _kubectl() -> Path:
    from hack.controlplane import kube_assets

    return kube_assets() / "kubectl"


def down(quiet: bool = False) -> int:
    alive = running()
    if {"controller", "agent", "kube-apiserver"} <= alive.keys():
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
    for name, ref in alive.items():
        if not quiet:
            say(f"stopping {name} ({ref.pid})")
        # Each component leads its own session (start_new_session): stop its helpers too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(ref.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(ref.alive() for ref in alive.values()):
        time.sleep(0.2)
    for ref in alive.values():
        if ref.alive():
            os.kill(ref.pid, signal.SIGKILL)
    removed = _remove_machines(quiet)
    shutil.rmtree(PIDS, ignore_errors=True)
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)
    shutil.rmtree(CACHE / "cluster", ignore_errors=True)
    KUBECONFIG.unlink(missing_ok=True)
    if not removed:
        say("some machines could not be removed (see above); run `make down` again")
    return 0 if removed else 1


def _remove_machines(quiet: bool) -> bool:
    """Whatever the Zmachines' deletion left (agent or API server dead, controller killed):
    VMMs live in sessions of their own and outlive every component, so tear them down
    offline, with no agent running."""
    if not AGENT_FLAGS.exists():
        return True  # no agent was ever started here
    if not quiet:
        say("removing the agent's machines (zmachine-agent cleanup)")
    flags = json.loads(AGENT_FLAGS.read_text())
    return subprocess.run([*AGENT_MAIN, "cleanup", *flags], check=False).returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["up", "down"])
    args = parser.parse_args()
    return up() if args.action == "up" else down()


if __name__ == "__main__":
    sys.exit(main())
