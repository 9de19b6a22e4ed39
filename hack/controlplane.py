"""A real local Kubernetes control plane (etcd + kube-apiserver) on loopback.

Used by the test suite and by `make run`. Binaries come from KUBEBUILDER_ASSETS when set
(as with controller-runtime's envtest), otherwise from hack/build-kube-assets.sh, which
builds them once from their Go modules into a cache.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)
HACK = Path(__file__).resolve().parent


class ControlPlaneError(RuntimeError):
    """The control plane could not be built or started."""


def kube_assets() -> Path:
    env = os.environ.get("KUBEBUILDER_ASSETS")
    if env:
        path = Path(env)
        for binary in ("kube-apiserver", "etcd", "kubectl"):
            if not (path / binary).is_file():
                raise ControlPlaneError(f"KUBEBUILDER_ASSETS={path} has no {binary}")
        return path
    result = subprocess.run(
        ["bash", str(HACK / "build-kube-assets.sh")], stdout=subprocess.PIPE, text=True
    )
    if result.returncode != 0:
        raise ControlPlaneError("hack/build-kube-assets.sh failed; see its output above")
    return Path(result.stdout.strip().splitlines()[-1])


def guest_kernel_dir() -> Path:
    """vmlinuz + initramfs.img for container mode, built (cached) by hack/build-guest-kernel.sh."""
    return _built_by("build-guest-kernel.sh", timeout=600)


def virtiofsd_path() -> Path:
    """The Rust virtiofsd pinned in hack/versions.env, built (cached) by hack/build-virtiofsd.sh."""
    return _built_by("build-virtiofsd.sh", timeout=1800)


def debian_vm_root_dir() -> Path:
    """The seed's guide guests (root/, app-image.tar), built (cached) by
    hack/build-debian-vm-root.sh: the first build debootstraps for 9-16 minutes."""
    return _built_by("build-debian-vm-root.sh", timeout=3600)


def wireguard_go_path() -> Path:
    """wireguard-go pinned in hack/versions.env, built (cached) by hack/build-wireguard-go.sh."""
    return _built_by("build-wireguard-go.sh", timeout=900)


def standin_vmm_path() -> Path:
    """The stand-in for cloud-hypervisor (tests/bench/standin_vmm.c, runs no guest) that the
    tests and the scale benchmark give agents as --vmm-binary, built (cached by its source's
    hash) by hack/build-standin-vmm.sh. Resolved, as the agent resolves --vmm-binary: its
    VMMs' argv[0] is this path."""
    return _built_by("build-standin-vmm.sh", timeout=300).resolve()


def _built_by(script: str, timeout: float) -> Path:
    """The path a hack/ build script prints last (its cached output)."""
    result = subprocess.run(
        ["bash", str(HACK / script)], stdout=subprocess.PIPE, text=True, check=True,
        timeout=timeout,
    )  # fmt: skip
    return Path(result.stdout.strip().splitlines()[-1])


def free_port() -> int:
    """A loopback TCP port nobody listens on, for a server started later. Taken below the
    kernel's ephemeral range: a port from it could be given to an outgoing connection (a
    kubectl, a gRPC client) before the server binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken: try another
            return port
    raise RuntimeError(f"no free loopback port below {low}")


# `openssl req` arguments that make a fresh P-256 key; the key file name follows.
_NEW_EC_KEY = ("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


# The name of kube-apiserver's front-proxy client certificate (--requestheader-allowed-names).
FRONT_PROXY_CLIENT = "front-proxy-client"

# Every write (with who made it and when) at Metadata level; reads are not logged.
_AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  verbs: [create, update, patch, delete, deletecollection]
- level: None
"""


def aggregation_flags(pki: Path) -> list[str]:
    """The aggregation layer: kube-apiserver proxies aggregated APIs (the console's) with its
    front-proxy client certificate and names the user in these headers; extension servers
    read all of it from kube-system/extension-apiserver-authentication."""
    return [
        f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
        f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
    ]


def make_front_proxy_pki(pki: Path) -> None:
    """The front proxy's CA and client certificate in `pki`, once."""
    if (pki / "front-proxy-client.crt").exists():
        return
    # Its own CA, as kubeadm does: a user certificate from the cluster CA must never pass
    # for the front proxy (which may name any user).
    _openssl(*_NEW_EC_KEY, "front-proxy-ca.key", "-x509", "-out", "front-proxy-ca.crt",
             "-days", "365", "-subj", "/CN=zmachine-local-front-proxy-ca",
             cwd=pki)  # fmt: skip
    _openssl(*_NEW_EC_KEY, "front-proxy-client.key", "-out", "front-proxy-client.csr",
             "-subj", f"/CN={FRONT_PROXY_CLIENT}", cwd=pki)  # fmt: skip
    _openssl("x509", "-req", "-in", "front-proxy-client.csr", "-CA", "front-proxy-ca.crt",
             "-CAkey", "front-proxy-ca.key", "-CAcreateserial",
             "-out", "front-proxy-client.crt", "-days", "365", cwd=pki)  # fmt: skip


@dataclass
class ControlPlane:
    """etcd and kube-apiserver under `workdir`; `kubeconfig` is the cluster-admin config.

    With `audit`, kube-apiserver logs every write to `audit_log` (one JSON event a line)."""

    workdir: Path
    assets: Path = field(default_factory=kube_assets)
    port: int = field(default_factory=free_port)
    audit: bool = False
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _names: list[str] = field(default_factory=list)
    _argv: dict[str, list[str]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    def start(self, timeout: float = 90.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._make_pki()
        etcd_port, peer_port = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._spawn(
            "etcd",
            [
                str(self.assets / "etcd"),
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        pki = self.pki
        self._spawn(
            "kube-apiserver",
            [
                str(self.assets / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                # Loopback cannot back the `kubernetes` Service endpoints; none are needed.
                "--endpoint-reconciler-type=none",
                f"--secure-port={self.port}",
                f"--cert-dir={self.workdir / 'serving'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                # Addresses are bookkeeping only: nothing here routes to this range.
                "--service-cluster-ip-range=10.96.0.0/24",
                "--authorization-mode=RBAC",
                # A request without credentials is 401, not a user named system:anonymous
                # (the console tests check that a missing token is refused as such).
                "--anonymous-auth=false",
                "--disable-admission-plugins=ServiceAccount",
                "--allow-privileged=true",
                "--v=1",
                *aggregation_flags(self.pki),
                *self._audit_flags(),
            ],
        )
        self._write_kubeconfig(self.kubeconfig, "admin", ["system:masters"])
        self._wait_ready(timeout)
        log.info("control plane ready", url=self.url, kubeconfig=str(self.kubeconfig))

    def _audit_flags(self) -> list[str]:
        if not self.audit:
            return []
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(_AUDIT_POLICY)
        return [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            # Written as each request completes, so a test reads it right after acting.
            "--audit-log-mode=blocking",
            "--audit-log-maxsize=0",
        ]

    def audit_events(self) -> list[dict[str, Any]]:
        """The audit log so far (needs `audit=True`)."""
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines() if line]

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver alone; etcd and its data stay."""
        proc = self._procs[self._names.index("kube-apiserver")]
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def start_apiserver(self, timeout: float = 90.0) -> None:
        """Start kube-apiserver again, on the same port with the same certificates."""
        index = self._names.index("kube-apiserver")
        if self._procs[index].poll() is None:
            raise ControlPlaneError("kube-apiserver is still running")
        del self._names[index], self._procs[index]
        self._spawn("kube-apiserver", self._argv["kube-apiserver"])
        self._wait_ready(timeout)

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        self._names.clear()

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in zip(self._names, self._procs, strict=True)}

    def user_kubeconfig(self, user: str, groups: list[str]) -> Path:
        """A kubeconfig authenticating as `user` in `groups` via a client certificate
        (a user of its own in the audit log; group system:masters makes it cluster-admin)."""
        path = self.workdir / f"kubeconfig-{user}"
        self._write_kubeconfig(path, user, groups)
        return path

    def token_kubeconfig(self, path: Path, token: str | None) -> Path:
        """A kubeconfig that sends ``token`` as a bearer token (none: no credentials)."""
        user: dict[str, Any] = {"token": token} if token else {}
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "local",
                            "cluster": {
                                "server": self.url,
                                "certificate-authority": str(
                                    self.workdir / "serving" / "apiserver.crt"
                                ),
                            },
                        }
                    ],
                    "users": [{"name": "user", "user": user}],
                    "contexts": [
                        {"name": "local", "context": {"cluster": "local", "user": "user"}}
                    ],
                    "current-context": "local",
                }
            )
        )
        return path

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.assets / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            check=check,
            input=input,
        )

    def get(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        """The object as JSON, or None when it does not exist."""
        result = self.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
        if result.returncode != 0:
            return None
        obj: dict[str, Any] = json.loads(result.stdout)
        return obj

    def _spawn(self, name: str, argv: list[str]) -> None:
        logfile = (self.workdir / f"{name}.log").open("ab")
        self._argv[name] = argv
        self._names.append(name)
        proc = subprocess.Popen(
            argv, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._procs.append(proc)

    def _make_pki(self) -> None:
        pki = self.pki
        pki.mkdir(parents=True, exist_ok=True)
        if not (pki / "ca.crt").exists():
            _openssl(*_NEW_EC_KEY, "ca.key", "-x509", "-out", "ca.crt", "-days", "365",
                     "-subj", "/CN=zmachine-local-ca", cwd=pki)  # fmt: skip
            _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
            _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
        make_front_proxy_pki(pki)

    def _client_cert(self, user: str, groups: list[str]) -> tuple[Path, Path]:
        pki = self.pki
        subject = "/" + "/".join([*(f"O={g}" for g in groups), f"CN={user}"])
        key, csr, crt = f"{user}.key", f"{user}.csr", f"{user}.crt"
        if not (pki / crt).exists():
            _openssl(*_NEW_EC_KEY, key, "-out", csr, "-subj", subject, cwd=pki)
            _openssl(
                "x509",
                "-req",
                "-in",
                csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                crt,
                "-days",
                "365",
                cwd=pki,
            )
        return pki / crt, pki / key

    def _write_kubeconfig(self, path: Path, user: str, groups: list[str]) -> None:
        crt, key = self._client_cert(user, groups)
        # The serving certificate is self-signed by kube-apiserver at start-up; the
        # cluster CA file is only known after that, so trust it by file once it exists.
        path.write_text(
            f"""apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: {self.url}
    certificate-authority: {self.workdir / "serving" / "apiserver.crt"}
users:
- name: {user}
  user:
    client-certificate: {crt}
    client-key: {key}
contexts:
- name: local
  context: {{cluster: local, user: {user}, namespace: default}}
current-context: local
"""
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        crt, key = self._client_cert("admin", ["system:masters"])
        last = "not started"
        while time.monotonic() < deadline:
            for name, proc in zip(self._names, self._procs, strict=True):
                if proc.poll() is not None:
                    self.stop()
                    raise ControlPlaneError(
                        f"{name} exited with {proc.returncode}; see {self.workdir}/{name}.log"
                    )
            serving = self.workdir / "serving" / "apiserver.crt"
            if serving.exists():
                ctx = ssl.create_default_context(cafile=str(serving))
                ctx.load_cert_chain(str(crt), str(key))
                try:
                    with urllib.request.urlopen(f"{self.url}/readyz", context=ctx, timeout=5) as r:
                        if r.status == 200:
                            return
                except OSError as exc:
                    last = str(exc)
            time.sleep(0.5)
        self.stop()
        raise ControlPlaneError(f"kube-apiserver not ready after {timeout:.0f}s: {last}")


def clean(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
