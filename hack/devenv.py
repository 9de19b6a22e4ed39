"""`make run` / `make down`: a local control plane, the controller and the examples.

Everything lives under .cache/ in the checkout; process ids go to .cache/pids so that
`make down` stops exactly what `make run` started.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from hack.controlplane import ControlPlane, free_port

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
    if "controller" not in _running():
        say("starting the controller (log: .cache/logs/controller.log)")
        _spawn(
            "controller",
            [
                sys.executable,
                "-m",
                "controller.operator.main",
                "--metrics-port",
                str(free_port()),
                "--health-port",
                str(free_port()),
            ],
            env,
        )
    say("applying examples/")
    subprocess.run([*kubectl, "apply", "-f", str(REPO / "examples")], check=True)
    return _wait_accepted(kubectl)


def _wait_accepted(kubectl: list[str]) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        out = subprocess.run(
            [*kubectl, "get", "zm", "-o", "json"], capture_output=True, text=True, check=True
        ).stdout
        items = json.loads(out)["items"]
        phases = {i["metadata"]["name"]: (i.get("status") or {}).get("phase") for i in items}
        if items and all(phases.values()):
            say(
                "controller running, Zmachines accepted: "
                + ", ".join(f"{n}={p}" for n, p in phases.items())
            )
            print(f"""
Next:
  export KUBECONFIG={KUBECONFIG} PATH={BIN}:$PATH
  kubectl get zm              # phase, node, mode, IP
  kubectl describe zm hello   # conditions and events
  make down                   # stop everything
""")
            return 0
        time.sleep(1)
    say("the controller did not pick up the examples; see .cache/logs/controller.log")
    return 1


def _kubectl() -> Path:
    from hack.controlplane import kube_assets

    return kube_assets() / "kubectl"


def down(quiet: bool = False) -> int:
    running = _running()
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
