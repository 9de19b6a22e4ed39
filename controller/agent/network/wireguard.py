"""The encrypted overlay between nodes: one userspace WireGuard (wireguard-go) per network
per node, as zos runs one kernel WireGuard per network resource.

wireguard-go is started in the node's namespace, so that its UDP socket is on the
underlay, and its TUN device is then moved into the network's namespace (wireguard-go
follows its device across namespaces). It is configured over its UAPI socket
(``/var/run/wireguard/<dev>.sock``), a line protocol, so no ``wg`` tool is needed.
"""

from __future__ import annotations

import base64
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from controller.agent.errors import FailedPrecondition
from controller.agent.network.local import NetworkError, netns_argv
from controller.agent.runtime.procs import ProcessRef, spawn_detached

log = structlog.get_logger(__name__)

UAPI_DIR = Path("/var/run/wireguard")
KEEPALIVE_SECONDS = 20
MTU = 1420  # 1500 minus WireGuard's 80 bytes over IPv6 underlays


@dataclass(frozen=True)
class Peer:
    public_key: str  # base64
    endpoint: str  # host:port
    allowed_ips: tuple[str, ...]


def node_key(path: Path) -> X25519PrivateKey:
    """The node's overlay key, made on first use (0600), shared by all its networks."""
    if not path.exists():
        raw = X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(raw).decode())
        os.replace(tmp, path)
    return X25519PrivateKey.from_private_bytes(base64.b64decode(path.read_text().strip()))


def public_key(key: X25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def _hex(b64: str) -> str:
    return base64.b64decode(b64).hex()


def start(binary: Path, device: str, node_netns: str | None, log_path: Path) -> ProcessRef:
    """wireguard-go for `device`, in the node's namespace; returns once the device exists."""
    argv = [*netns_argv(node_netns), "env", "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1",
            str(binary), "-f", device]  # fmt: skip
    ref = spawn_detached(argv, log_path, marker=device)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if socket_path(device).exists():
            return ref
        if not ref.alive():
            break
        time.sleep(0.05)
    raise NetworkError(
        f"wireguard-go for {device} did not start: {log_path.read_text(errors='replace')[-500:]}"
    )


def socket_path(device: str) -> Path:
    return UAPI_DIR / f"{device}.sock"


def configure(
    device: str, key: X25519PrivateKey, listen_port: int, peers: list[Peer] | None
) -> None:
    """Set the key and port, and (when given) replace the peers with `peers`."""
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    lines = ["set=1", f"private_key={raw.hex()}", f"listen_port={listen_port}"]
    if peers is not None:
        lines.append("replace_peers=true")
        for p in peers:
            lines += [
                f"public_key={_hex(p.public_key)}",
                f"endpoint={p.endpoint}",
                f"persistent_keepalive_interval={KEEPALIVE_SECONDS}",
                "replace_allowed_ips=true",
                *(f"allowed_ip={a}" for a in p.allowed_ips),
            ]
    reply = _uapi(device, "\n".join(lines) + "\n\n")
    if "errno=0" not in reply:
        raise NetworkError(f"wireguard {device}: configuration refused: {reply.strip()}")


def _uapi(device: str, request: str) -> str:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(socket_path(device)))
            s.sendall(request.encode())
            reply = b""
            while not reply.endswith(b"\n\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except OSError as exc:
        raise NetworkError(f"wireguard {device}: {socket_path(device)}: {exc}") from exc
    return reply.decode(errors="replace")


def require(binary: Path | None, what: str) -> Path:
    if binary is None:
        raise FailedPrecondition(
            f"{what}: this node has no wireguard-go (--wireguard-go, or on PATH), so it "
            "cannot join private networks spanning nodes"
        )
    return binary
