"""Agent configuration from CLI flags, each with a ZMACHINE_AGENT_* environment fallback."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from controller.agent.errors import InvalidSpec
from controller.agent.rpc.tls import ServerTLS
from controller.agent.runtime.layout import check_state_dir

HypervisorChoice = Literal["auto", "cloud-hypervisor", "qemu"]
AccelChoice = Literal["auto", "kvm", "tcg"]
ENV_PREFIX = "ZMACHINE_AGENT_"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class Supervision:
    """Restart rules: exponential backoff, and a crash loop ends in FAILED."""

    interval: float = 2.0  # seconds between liveness checks of every VMM
    backoff_base: float = 2.0  # first restart delay; doubles per consecutive crash
    backoff_max: float = 60.0
    crash_loop_limit: int = 5  # consecutive quick exits before giving up
    healthy_after: float = 60.0  # a VMM up this long resets the crash counter


@dataclass(frozen=True)
class AgentConfig:
    listen: str
    state_dir: Path
    node_name: str
    bridge: str
    netns: str | None
    cidr: str
    metrics_port: int
    tls: ServerTLS | None  # None only with --insecure-dev
    hypervisor: HypervisorChoice
    accel: AccelChoice
    guest_kernel_dir: Path | None
    supervision: Supervision
    flist_dirs: tuple[Path, ...] = ()  # where file:// flists may be read from
    firmware: Path | None = None  # cloud-hypervisor's disk-boot firmware (image mode)
    vmm_binary: Path | None = None  # run this instead of cloud-hypervisor from PATH
    memory_capacity: int | None = None  # what the agent hands out; None: physical memory
    virtiofsd: Path | None = None  # the Rust virtiofsd; None: found on PATH
    wireguard_go: Path | None = None  # the private networks' overlay; None: found on PATH
    underlay_address: str = ""  # this node's address other nodes' overlays reach
    public_interface: str | None = None  # the uplink bridged to public NICs; None: no publicIP
    yggdrasil: Path | None = None  # the planetary router; None: found on PATH
    mycelium: Path | None = None  # the networks' mycelium routers; None: found on PATH
    # Node registration (ZmachineNode + Lease heartbeat): on with --kubeconfig or in a pod.
    kubeconfig: str | None = None
    advertise_address: str = ""  # what the controller dials; defaults to --listen
    lease_namespace: str = "zmachine-system"
    register: bool = False
    log_rotate_bytes: int = 8 << 20
    console_log_keep: int = 3  # rotated console logs kept (console.log.1 ... .3)

    @property
    def flist_cache(self) -> Path:
        return self.state_dir / "cache"

    @property
    def machines_dir(self) -> Path:
        return self.state_dir / "machines"


def _env(flag: str) -> str | None:
    return os.environ.get(ENV_PREFIX + flag.upper().replace("-", "_")) or None


def _env_str(flag: str, default: str) -> str:
    return _env(flag) or default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zmachine-agent serve",
        description="Run the Zmachine node agent (gRPC API + Prometheus metrics).",
    )
    p.add_argument("--listen", default=_env_str("listen", "0.0.0.0:7443"), help="gRPC host:port")
    p.add_argument("--state-dir", default=_env_str("state-dir", "/var/lib/zmachine-agent"))
    p.add_argument("--node-name", default=_env_str("node-name", socket.gethostname()))
    p.add_argument("--bridge", default=_env_str("bridge", "zmbr0"), help="bridge the taps join")
    p.add_argument("--netns", default=_env("netns"), help="network namespace of bridge and taps")
    p.add_argument("--cidr", default=_env_str("cidr", "10.200.0.0/24"), help="node-local guest IPs")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(_env_str("metrics-port", "9464")),
        help="Prometheus port on the listen host; 0 disables",
    )
    p.add_argument("--tls-ca", default=_env("tls-ca"), help="CA that signs client certs")
    p.add_argument("--tls-cert", default=_env("tls-cert"), help="server certificate")
    p.add_argument("--tls-key", default=_env("tls-key"), help="server key")
    p.add_argument(
        "--insecure-dev",
        action="store_true",
        default=_env_str("insecure-dev", "") in ("1", "true", "yes"),
        help="serve plaintext gRPC (loopback development only)",
    )
    p.add_argument(
        "--hypervisor",
        choices=["auto", "cloud-hypervisor", "qemu"],
        default=_env_str("hypervisor", "auto"),
    )
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default=_env_str("accel", "auto"))
    p.add_argument(
        "--guest-kernel-dir",
        default=_env("guest-kernel-dir"),
        help="dir with vmlinuz + initramfs.img for container mode (hack/build-guest-kernel.sh)",
    )
    p.add_argument(
        "--firmware",
        default=_env("firmware"),
        help="rust-hypervisor-firmware (hypervisor-fw): cloud-hypervisor boots image-mode "
        "disks with it (QEMU uses its own SeaBIOS)",
    )
    p.add_argument(
        "--vmm-binary",
        default=_env("vmm-binary"),
        help="run this program as cloud-hypervisor instead of the one on PATH (only with "
        "--hypervisor cloud-hypervisor; tests use a stand-in VMM here)",
    )
    p.add_argument(
        "--memory-capacity",
        type=int,
        default=None,
        help="bytes of guest memory the node hands out (default: its physical memory); "
        "more than physical only with --vmm-binary, whose stand-in VMMs allocate none",
    )
    p.add_argument(
        "--virtiofsd",
        default=_env("virtiofsd"),
        help="the Rust virtiofsd (hack/build-virtiofsd.sh); default: 'virtiofsd' on PATH, "
        "else QEMU 7.2's deprecated C daemon",
    )
    p.add_argument(
        "--flist-dir",
        action="append",
        default=[d for d in (_env("flist-dirs") or "").split(":") if d],
        help="directory file:// flist URLs may point into (repeatable; default: none)",
    )
    p.add_argument("--kubeconfig", default=_env("kubeconfig"), help="register the node here")
    p.add_argument(
        "--advertise-address",
        default=_env("advertise-address"),
        help="host:port the controller dials (default: --listen)",
    )
    p.add_argument(
        "--wireguard-go",
        default=_env("wireguard-go"),
        help="wireguard-go binary for private networks across nodes (default: on PATH)",
    )
    p.add_argument(
        "--underlay-address",
        default=_env("underlay-address"),
        help="IP other nodes reach this node's overlay at (default: --advertise-address's host)",
    )
    p.add_argument(
        "--yggdrasil",
        default=_env("yggdrasil"),
        help="yggdrasil binary, the node's planetary router (default: on PATH)",
    )
    p.add_argument(
        "--mycelium",
        default=_env("mycelium"),
        help="mycelium binary, the routers of mycelium NICs (default: on PATH)",
    )
    p.add_argument(
        "--public-interface",
        default=_env("public-interface"),
        help="interface of the node namespace bridged to guests' public NICs (publicIP); "
        "dedicate it to guests: the node's own addresses on it stop serving the node",
    )
    p.add_argument("--lease-namespace", default=_env_str("lease-namespace", "zmachine-system"))
    p.add_argument("--restart-backoff", type=float, default=float(_env_str("restart-backoff", "2")))
    p.add_argument("--crash-loop-limit", type=int, default=int(_env_str("crash-loop-limit", "5")))
    p.add_argument(
        "--monitor-interval", type=float, default=float(_env_str("monitor-interval", "2"))
    )
    return p


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_config(argv: Sequence[str]) -> AgentConfig:
    a = build_parser().parse_args(argv)
    try:
        ipaddress.IPv4Network(a.cidr)
    except ValueError as exc:
        raise InvalidSpec(f"--cidr {a.cidr!r} is not an IPv4 network: {exc}") from exc
    vmm_binary = Path(a.vmm_binary).resolve() if a.vmm_binary else None
    if vmm_binary is not None:
        if a.hypervisor != "cloud-hypervisor":
            raise InvalidSpec(
                f"--vmm-binary {a.vmm_binary} needs --hypervisor cloud-hypervisor "
                f"(got --hypervisor {a.hypervisor})"
            )
        if not os.access(vmm_binary, os.X_OK) or not vmm_binary.is_file():
            raise InvalidSpec(f"--vmm-binary {a.vmm_binary} is not an executable file")
    if a.memory_capacity is not None and (
        a.memory_capacity <= 0 or (a.memory_capacity > host_memory() and vmm_binary is None)
    ):
        raise InvalidSpec(
            f"--memory-capacity {a.memory_capacity} must be positive and at most the host's "
            f"{host_memory()} bytes (more only with a stand-in --vmm-binary)"
        )
    tls: ServerTLS | None = None
    if a.insecure_dev:
        host = a.listen.rsplit(":", 1)[0].strip("[]")
        if host not in LOOPBACK:
            raise InvalidSpec(
                f"--insecure-dev serves plaintext and only on loopback; --listen {a.listen} "
                f"is not one of {', '.join(LOOPBACK)}"
            )
    else:
        missing = [f for f in ("tls_ca", "tls_cert", "tls_key") if not getattr(a, f)]
        if missing:
            flags = ", ".join("--" + m.replace("_", "-") for m in missing)
            raise InvalidSpec(
                f"mutual TLS needs {flags} (write a dev set with `zmachine-agent certs DIR`), "
                "or pass --insecure-dev for plaintext on loopback"
            )
        tls = ServerTLS(Path(a.tls_ca), Path(a.tls_cert), Path(a.tls_key))
    state_dir = Path(a.state_dir).resolve()
    check_state_dir(state_dir)
    return AgentConfig(
        listen=a.listen,
        state_dir=state_dir,
        node_name=a.node_name,
        bridge=a.bridge,
        netns=a.netns or None,
        cidr=a.cidr,
        metrics_port=a.metrics_port,
        tls=tls,
        hypervisor=a.hypervisor,
        accel=a.accel,
        guest_kernel_dir=Path(a.guest_kernel_dir) if a.guest_kernel_dir else None,
        flist_dirs=tuple(Path(d).resolve() for d in a.flist_dir),
        firmware=Path(a.firmware).resolve() if a.firmware else None,
        vmm_binary=vmm_binary,
        memory_capacity=a.memory_capacity,
        virtiofsd=Path(a.virtiofsd).resolve() if a.virtiofsd else None,
        wireguard_go=Path(a.wireguard_go).resolve() if a.wireguard_go else None,
        underlay_address=_underlay(a.underlay_address, a.advertise_address or a.listen),
        public_interface=a.public_interface or None,
        yggdrasil=Path(a.yggdrasil).resolve() if a.yggdrasil else None,
        mycelium=Path(a.mycelium).resolve() if a.mycelium else None,
        kubeconfig=a.kubeconfig,
        advertise_address=a.advertise_address or a.listen,
        lease_namespace=a.lease_namespace,
        register=bool(a.kubeconfig or os.environ.get("KUBERNETES_SERVICE_HOST")),
        supervision=Supervision(
            interval=a.monitor_interval,
            backoff_base=a.restart_backoff,
            crash_loop_limit=a.crash_loop_limit,
        ),
    )


def _underlay(given: str | None, advertised: str) -> str:
    """The given address, else the advertised host when it is a usable IP, else "" (the
    node then serves no private network spanning nodes)."""
    if given:
        try:
            ipaddress.ip_address(given)
        except ValueError as exc:
            raise InvalidSpec(f"--underlay-address {given!r} is not an IP address") from exc
        return given
    host = advertised.rsplit(":", 1)[0].strip("[]")
    try:
        return "" if ipaddress.ip_address(host).is_unspecified else host
    except ValueError:
        return ""
