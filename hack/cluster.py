"""`make cluster`: a real one-node Kubernetes cluster on this machine, inside a network
namespace of its own; `make cluster-down` removes all of it.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy (built
from the pinned k8s.io/kubernetes module by hack/build-kube-assets.sh), Debian's containerd,
runc and CNI plugins (bridge, host-local, loopback), and Debian's Prometheus scraping the
cluster with the chart's alert rules. The namespace holds the node address, the pod bridge,
every listening port and kube-proxy's rules, so none of it appears in the host's namespace
and nothing collides with the loopback control planes of `make run` and the tests; reach it
with `ip netns exec zmcluster ...` (`make cluster` prints the commands).

The images built by hack/build-images.sh are imported into containerd; the chart is not
installed (tests/cluster does that, as a user would, with helm).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hack.controlplane import (
    _NEW_EC_KEY,
    HACK,
    _openssl,
    aggregation_flags,
    kube_assets,
    make_front_proxy_pki,
)
from hack.devenv import example_flist

NETNS = os.environ.get("ZMCLUSTER_NETNS") or "zmcluster"
NODE = "zmcluster"
NODE_IP = "10.231.0.1"
POD_CIDR = "10.232.0.0/24"
SERVICE_CIDR = "10.233.0.0/24"
SERVICE_IP = "10.233.0.1"  # the first address of SERVICE_CIDR: the `kubernetes` Service
API_PORT = 6443
PROMETHEUS = "127.0.0.1:9090"  # inside the namespace
STATE = Path("/var/lib/zmcluster")
RUN = Path("/run/zmcluster")
MNTNS = Path("/run/zmcluster-ns/mnt")  # the node's mount namespace, pinned by a bind mount
LOGS = STATE / "logs"
PKI = STATE / "pki"
AGENT_STATE = STATE / "agent"  # the chart's agent.stateDir on this node
FLISTS = STATE / "flists"  # the chart's agent.flistDirs on this node: the example's flist
GUEST_BRIDGE, GUEST_GATEWAY = "zmbr0", "10.200.0.1/24"  # the chart's agent.bridge and .cidr
CONTAINERD_SOCK = RUN / "containerd.sock"
ADMIN_KUBECONFIG = STATE / "admin.kubeconfig"
RULES = HACK.parent / "charts" / "zmachine-operator" / "rules" / "zmachine-operator.rules.yaml"
# Who each client certificate says it is: (user, groups).
IDENTITIES = {
    "admin": ("admin", ["system:masters"]),
    "kubelet": (f"system:node:{NODE}", ["system:nodes"]),
    "controller-manager": ("system:kube-controller-manager", []),
    "scheduler": ("system:kube-scheduler", []),
    "proxy": ("system:kube-proxy", []),
    "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", ["system:masters"]),
    "prometheus": ("zmcluster-prometheus", []),
}
ORDER = [
    "etcd",
    "kube-apiserver",
    "containerd",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "prometheus",
    "discovery",
]


class ClusterError(RuntimeError):
    """The cluster could not be brought up; the message names the component and its log."""


def say(message: str) -> None:
    print(f"[make cluster] {message}", flush=True)


def in_netns(*argv: str) -> list[str]:
    """argv run on the node: in its network and mount namespaces (nsenter, not `ip netns
    exec`, whose fresh /sys would hide the cgroup mounts from the kubelet)."""
    # --wd: entering a mount namespace resets the working directory to its root; `python -m
    # hack.cluster discover` runs from the repository.
    return [
        "nsenter",
        f"--net=/run/netns/{NETNS}",
        f"--mount={MNTNS}",
        f"--wd={HACK.parent}",
        *argv,
    ]


def run(*argv: str, check: bool = True, input: str | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, input=input, check=False)
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout


def _built_by(script: str, *args: str) -> Path:
    out = subprocess.run(
        ["bash", str(HACK / script), *args], stdout=subprocess.PIPE, text=True, check=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Binaries:
    control_plane: Path  # etcd, kube-apiserver, kubectl
    node: Path  # kubelet, kube-controller-manager, kube-scheduler, kube-proxy
    images: Path  # docker-archives of the controller, agent and pause images

    @classmethod
    def build(cls) -> Binaries:
        return cls(
            kube_assets(), _built_by("build-kube-assets.sh", "node"), _built_by("build-images.sh")
        )

    def path(self, name: str) -> str:
        where = self.control_plane if name in ("etcd", "kube-apiserver", "kubectl") else self.node
        return str(where / name)


# ---------------------------------------------------------------- network namespace, mounts


def netns_exists() -> bool:
    return NETNS in run("ip", "netns", "list", check=False).split()


def make_netns() -> None:
    run("ip", "netns", "add", NETNS)
    # Loopback carries the node address (no dummy links on every kernel): the API server
    # advertises it as the endpoint of the `kubernetes` Service, which pods reach through
    # kube-proxy's rules and the pod bridge's gateway.
    for cmd in (
        ["link", "set", "lo", "up"],
        ["addr", "add", f"{NODE_IP}/32", "dev", "lo"],
        # Host-network processes (the agent, Prometheus) need a route to Service addresses
        # for kube-proxy's OUTPUT rules to rewrite; pods come in through the bridge instead.
        ["route", "add", SERVICE_CIDR, "dev", "lo"],
        # The guests' bridge, which the agent expects on its node (docs/install.md).
        ["link", "add", GUEST_BRIDGE, "type", "bridge"],
        ["addr", "add", GUEST_GATEWAY, "dev", GUEST_BRIDGE],
        ["link", "set", GUEST_BRIDGE, "up"],
    ):
        run("ip", "-n", NETNS, *cmd)
    for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.route_localnet=1"):
        run(*in_netns("sysctl", "-qw", key))


def make_mount_ns() -> None:
    """The node's own mount namespace, with / shared as on a systemd host: the agent's
    Bidirectional and HostToContainer mounts (its state dir, /run, /run/netns) need shared
    or slave propagation there, and nothing the node mounts reaches the host's table."""
    for path in (STATE, RUN, MNTNS.parent):
        path.mkdir(parents=True, exist_ok=True)
    # A namespace file must sit on a private mount (else it would propagate into itself).
    run("mount", "--bind", str(MNTNS.parent), str(MNTNS.parent))
    run("mount", "--make-private", str(MNTNS.parent))
    MNTNS.touch()
    run("unshare", f"--mount={MNTNS}", "--propagation=private", "true")
    run("nsenter", f"--mount={MNTNS}", "mount", "--make-rshared", "/")


def mountpoints() -> list[str]:
    """Mount points in the node's mount namespace (none once it is gone)."""
    if not MNTNS.exists():
        return []
    out = run("nsenter", f"--mount={MNTNS}", "cat", "/proc/self/mountinfo", check=False)
    return [line.split()[4].replace("\\040", " ") for line in out.splitlines()]


def unmount_all() -> None:
    """Every mount the node made, deepest first (pod volumes, container root filesystems,
    pod network namespaces, the agent's FUSE/overlay/loop mounts), then the namespace."""
    for _ in range(3):
        ours = [p for p in mountpoints() if _under(p, STATE) or _under(p, RUN)]
        if not ours:
            break
        for point in sorted(set(ours), key=lambda p: p.count("/"), reverse=True):
            umount = ["nsenter", f"--mount={MNTNS}", "umount"]
            if subprocess.run([*umount, point], capture_output=True).returncode != 0:
                subprocess.run([*umount, "-l", point], capture_output=True)
    for path in (MNTNS, MNTNS.parent):
        subprocess.run(["umount", str(path)], capture_output=True)


def _host_mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def _under(path: str, root: Path) -> bool:
    return path == str(root) or path.startswith(f"{root}/")


def detach_loops() -> None:
    out = run("losetup", "--list", "--json", check=False)
    for dev in json.loads(out or "{}").get("loopdevices", []):
        backing = dev.get("back-file") or ""
        if _under(backing.removesuffix(" (deleted)"), STATE):
            subprocess.run(["losetup", "-d", dev["name"]], capture_output=True)


# ---------------------------------------------------------------- certificates, kubeconfigs


def make_pki() -> None:
    if (PKI / "ca.crt").exists():
        return
    PKI.mkdir(parents=True, exist_ok=True)
    _openssl(*_NEW_EC_KEY, "ca.key", "-x509", "-out", "ca.crt", "-days", "365",
             "-subj", "/CN=zmcluster-ca", cwd=PKI)  # fmt: skip
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=PKI)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=PKI)
    names = ["kubernetes", "kubernetes.default", "kubernetes.default.svc",
             "kubernetes.default.svc.cluster.local", "localhost"]  # fmt: skip
    ips = [NODE_IP, SERVICE_IP, "127.0.0.1"]
    san = ",".join([*(f"DNS:{n}" for n in names), *(f"IP:{i}" for i in ips)])
    _sign("apiserver", "/CN=kube-apiserver", san)
    _sign("kubelet-serving", f"/CN={NODE}", f"DNS:{NODE},IP:{NODE_IP}")
    for name, (user, groups) in IDENTITIES.items():
        _sign(name, "/" + "/".join([*(f"O={g}" for g in groups), f"CN={user}"]))
    make_front_proxy_pki(PKI)  # the chart's console is an aggregated API


def _sign(name: str, subject: str, san: str | None = None) -> None:
    _openssl(*_NEW_EC_KEY, f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=PKI)
    ext = PKI / f"{name}.ext"
    usage = "serverAuth" if san else "clientAuth"
    ext.write_text(f"extendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if san else ""))
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "365", "-extfile", str(ext),
             cwd=PKI)  # fmt: skip


def kubeconfig(name: str) -> Path:
    path = STATE / f"{name}.kubeconfig"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "zmcluster",
                        "cluster": {
                            "server": f"https://{NODE_IP}:{API_PORT}",
                            "certificate-authority": str(PKI / "ca.crt"),
                        },
                    }
                ],
                "users": [
                    {
                        "name": name,
                        "user": {
                            "client-certificate": str(PKI / f"{name}.crt"),
                            "client-key": str(PKI / f"{name}.key"),
                        },
                    }
                ],
                "contexts": [
                    {"name": "zmcluster", "context": {"cluster": "zmcluster", "user": name}}
                ],
                "current-context": "zmcluster",
            },
            indent=2,
        )
    )
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------- configuration files


def containerd_config(bins: Binaries) -> Path:
    path = STATE / "containerd.toml"
    path.write_text(
        f"""version = 2
root = "{STATE / "containerd"}"
state = "{RUN / "containerd"}"
[grpc]
  address = "{CONTAINERD_SOCK}"
[plugins."io.containerd.grpc.v1.cri"]
  # Built here by hack/build-images.sh from Kubernetes' own pause.c: no registry is reached.
  sandbox_image = "{(bins.images / "pause.ref").read_text().strip()}"
  # Pod network namespaces under our state, not /run/netns: `make cluster-down` finds them.
  netns_mounts_under_state_dir = true
  enable_unprivileged_ports = false
  # The kubelet asks for negative OOM scores (-998 for sandboxes), which need
  # CAP_SYS_RESOURCE; where root lacks it (some sandboxed machines), runc's init fails. Keep
  # every score at or above containerd's own instead, as rootless setups do.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        # runc's state of this node's containers, not the host's /run/containerd/runc.
        Root = "{RUN / "runc"}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{STATE / "cni" / "net.d"}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{STATE / "containerd-opt"}"
"""
    )
    conf = STATE / "cni" / "net.d" / "10-zmcluster.conflist"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": "zmcluster",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": "zmcni0",
                        "isGateway": True,
                        "hairpinMode": True,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": POD_CIDR}]],
                            "routes": [{"dst": "0.0.0.0/0"}],
                            "dataDir": str(STATE / "cni" / "ipam"),
                        },
                    },
                    {"type": "portmap", "capabilities": {"portMappings": True}},
                ],
            },
            indent=2,
        )
    )
    return path


def kubelet_config() -> Path:
    path = STATE / "kubelet.yaml"
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(PKI / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(PKI / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(PKI / "kubelet-serving.key"),
        "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCK}",
        "cgroupDriver": "cgroupfs",
        # This machine mounts cgroup v1 (v2 only as an empty `unified` hierarchy).
        "failCgroupV1": False,
        "failSwapOn": False,
        "readOnlyPort": 0,
        "podLogsDir": str(STATE / "pod-logs"),  # not the host's /var/log/pods
        "clusterDomain": "cluster.local",
        "resolvConf": "/etc/resolv.conf",
        # A machine shared with other work: evict on real shortage only.
        "evictionHard": {
            "memory.available": "200Mi",
            "nodefs.available": "2%",
            "imagefs.available": "2%",
        },
        "imageGCHighThresholdPercent": 99,
        "imageGCLowThresholdPercent": 98,
        "maxPods": 50,
        "serializeImagePulls": False,
        "shutdownGracePeriod": "0s",
    }
    path.write_text(json.dumps(config, indent=2))
    return path


TARGETS = STATE / "prometheus-targets.json"


def prometheus_config() -> Path:
    path = STATE / "prometheus.yml"
    kubeconfig("prometheus")  # the identity `discover` reads the endpoints with
    config = {
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                # Debian builds Prometheus without kubernetes_sd_configs (no client-go in
                # Debian): `discover` below writes the chart's metrics endpoints to a file.
                "job_name": "zmachine-operator",
                "honor_labels": True,  # the agents' namespace/name labels are the Zmachine's
                "file_sd_configs": [{"files": [str(TARGETS)], "refresh_interval": "5s"}],
            }
        ],
    }
    path.write_text(json.dumps(config, indent=2))
    return path


def discover(kubectl_bin: str, interval: float = 5.0) -> None:
    """Prometheus' service discovery for this node: the endpoints of every Service labelled
    app.kubernetes.io/name=zmachine-operator, port `metrics`, read under Prometheus' own
    identity, written as file_sd targets labelled with the component and the pod."""
    argv = [kubectl_bin, f"--kubeconfig={STATE / 'prometheus.kubeconfig'}", "get", "-o", "json"]
    while True:
        groups = []
        services = run(*argv, "services", "-A", "-l", "app.kubernetes.io/name=zmachine-operator",
                       check=False)  # fmt: skip
        for svc in json.loads(services or '{"items": []}')["items"]:
            meta = svc["metadata"]
            slices = run(*argv, "endpointslices", "-n", meta["namespace"], "-l",
                         f"kubernetes.io/service-name={meta['name']}", check=False)  # fmt: skip
            for eps in json.loads(slices or '{"items": []}')["items"]:
                ports = [p["port"] for p in eps.get("ports") or [] if p.get("name") == "metrics"]
                for ep, port in ((e, p) for e in eps.get("endpoints") or [] for p in ports):
                    labels = {
                        "component": meta["labels"].get("app.kubernetes.io/component", ""),
                        "pod": (ep.get("targetRef") or {}).get("name", ""),
                    }
                    groups += [
                        {"targets": [f"{a}:{port}"], "labels": labels} for a in ep["addresses"]
                    ]
        tmp = TARGETS.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(TARGETS)
        time.sleep(interval)


PROMETHEUS_RBAC = """apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: zmcluster-prometheus}
rules:
- apiGroups: [""]
  resources: [services, endpoints, pods]
  verbs: [get, list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: zmcluster-prometheus}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: zmcluster-prometheus}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: zmcluster-prometheus}
"""


# ---------------------------------------------------------------- processes


def argv_of(name: str, bins: Binaries) -> list[str]:
    kc = {n: str(kubeconfig(n)) for n in ("controller-manager", "scheduler", "kubelet", "proxy")}
    return {
        "etcd": [
            bins.path("etcd"), f"--data-dir={STATE / 'etcd'}",
            "--listen-client-urls=http://127.0.0.1:2379",
            "--advertise-client-urls=http://127.0.0.1:2379",
            "--listen-peer-urls=http://127.0.0.1:2380", "--log-level=warn",
        ],
        "kube-apiserver": [
            bins.path("kube-apiserver"), "--etcd-servers=http://127.0.0.1:2379",
            "--bind-address=0.0.0.0", f"--advertise-address={NODE_IP}",
            f"--secure-port={API_PORT}",
            f"--tls-cert-file={PKI / 'apiserver.crt'}",
            f"--tls-private-key-file={PKI / 'apiserver.key'}",
            f"--client-ca-file={PKI / 'ca.crt'}",
            f"--kubelet-client-certificate={PKI / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={PKI / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={PKI / 'ca.crt'}",
            f"--service-account-key-file={PKI / 'sa.pub'}",
            f"--service-account-signing-key-file={PKI / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--kubelet-preferred-address-types=InternalIP",  # no DNS for the node's name
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true", "--v=1", *aggregation_flags(PKI),
            "--enable-aggregator-routing=true",  # to the console pod, not its Service
        ],
        "containerd": ["containerd", f"--config={containerd_config(bins)}"],
        "kube-controller-manager": [
            bins.path("kube-controller-manager"), f"--kubeconfig={kc['controller-manager']}",
            f"--authentication-kubeconfig={kc['controller-manager']}",
            f"--authorization-kubeconfig={kc['controller-manager']}",
            f"--service-account-private-key-file={PKI / 'sa.key'}",
            f"--root-ca-file={PKI / 'ca.crt'}",
            "--use-service-account-credentials=true", "--leader-elect=false",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--bind-address=127.0.0.1",
        ],
        "kube-scheduler": [
            bins.path("kube-scheduler"), f"--kubeconfig={kc['scheduler']}",
            f"--authentication-kubeconfig={kc['scheduler']}",
            f"--authorization-kubeconfig={kc['scheduler']}",
            "--leader-elect=false", "--bind-address=127.0.0.1",
        ],
        "kubelet": [
            bins.path("kubelet"), f"--config={kubelet_config()}",
            f"--kubeconfig={kc['kubelet']}", f"--root-dir={STATE / 'kubelet'}",
            f"--cert-dir={STATE / 'kubelet-pki'}", f"--hostname-override={NODE}",
            f"--node-ip={NODE_IP}", "--v=1",
        ],
        "kube-proxy": [
            bins.path("kube-proxy"), f"--kubeconfig={kc['proxy']}",
            f"--hostname-override={NODE}", f"--cluster-cidr={POD_CIDR}",
            "--proxy-mode=iptables", "--conntrack-max-per-core=0",
            "--metrics-bind-address=127.0.0.1:10249",
        ],
        "discovery": [sys.executable, "-m", "hack.cluster", "discover"],
        "prometheus": [
            "prometheus", f"--config.file={prometheus_config()}",
            f"--storage.tsdb.path={STATE / 'prometheus'}",
            f"--web.listen-address={PROMETHEUS}", "--web.enable-lifecycle",
        ],
    }[name]  # fmt: skip


def spawn(name: str, argv: list[str]) -> None:
    LOGS.mkdir(parents=True, exist_ok=True)
    with (LOGS / f"{name}.log").open("ab") as log:
        subprocess.Popen(
            in_netns(*argv), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for(what: str, check: object, timeout: float, log: str) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    raise ClusterError(f"{what} not ready after {timeout:.0f}s; see {LOGS / log}.log")


def kubectl(bins: Binaries, *args: str, check: bool = True, input: str | None = None) -> str:
    return run(*in_netns(bins.path("kubectl"), f"--kubeconfig={ADMIN_KUBECONFIG}", *args),
               check=check, input=input)  # fmt: skip


def _ok(*argv: str) -> bool:
    return subprocess.run(in_netns(*argv), capture_output=True).returncode == 0


def up() -> int:
    if netns_exists():
        say(f"netns {NETNS} exists: the cluster is up (or half up: `make cluster-down`)")
        return 0
    say("building or finding the binaries and images (cached after the first run)")
    bins = Binaries.build()
    make_mount_ns()
    make_netns()
    make_pki()
    kubeconfig("admin")
    example_flist(FLISTS)
    for name in ORDER:
        if name == "kube-controller-manager":
            _import_images(bins)
        say(f"starting {name}")
        spawn(name, argv_of(name, bins))
        if name == "kube-apiserver":
            wait_for("kube-apiserver", lambda: _ok(
                bins.path("kubectl"), f"--kubeconfig={ADMIN_KUBECONFIG}", "get", "--raw=/readyz"
            ), 120, name)  # fmt: skip
            kubectl(bins, "apply", "-f", "-", input=PROMETHEUS_RBAC)
        if name == "containerd":
            wait_for("containerd", lambda: CONTAINERD_SOCK.exists(), 60, name)
    wait_for("node Ready", lambda: "True" in kubectl(
        bins, "get", "node", NODE, "-o",
        "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False,
    ), 180, "kubelet")  # fmt: skip
    wait_for("the kubernetes Service through kube-proxy", lambda: _ok(
        "curl", "-sk", "--max-time", "3", f"https://{SERVICE_IP}/readyz"
    ), 120, "kube-proxy")  # fmt: skip
    say(f"""ready: node {NODE} in netns {NETNS}
  alias k='ip netns exec {NETNS} {bins.path("kubectl")} --kubeconfig={ADMIN_KUBECONFIG}'
  k get nodes,pods -A
  ip netns exec {NETNS} curl -s http://{PROMETHEUS}/api/v1/targets   # Prometheus
  logs: {LOGS}/*.log      make cluster-down removes everything""")
    return 0


def _import_images(bins: Binaries) -> None:
    for archive in [bins.images / "pause.tar", *sorted(bins.images.glob("zmachine-*.tar"))]:
        say(f"importing {archive.name} into containerd")
        run("ctr", f"--address={CONTAINERD_SOCK}", "-n", "k8s.io", "images", "import",
            str(archive))  # fmt: skip


# ---------------------------------------------------------------- down


def down() -> int:
    """Stops everything and removes every trace, even when components died half-way."""
    if netns_exists():
        _kill_netns_processes("kubelet")  # first, or it restarts what is stopped next
    if CONTAINERD_SOCK.exists():
        _stop_containers()
    if netns_exists():
        _kill_netns_processes()
    unmount_all()
    detach_loops()
    if netns_exists():
        run("ip", "netns", "del", NETNS, check=False)
    left = [
        p
        for p in _host_mountpoints()
        if _under(p, STATE) or _under(p, RUN) or _under(p, MNTNS.parent)
    ]
    if not left:
        for path in (STATE, RUN, MNTNS.parent):
            shutil.rmtree(path, ignore_errors=True)
    if left or netns_exists():
        say(f"could not remove: {left or NETNS}; run `make cluster-down` again")
        return 1
    say("removed the cluster, its namespace, mounts and state")
    return 0


def _stop_containers() -> None:
    """Kill every container of the node's containerd (VMs in the agent's pod included: runc
    kills the whole cgroup of a container)."""
    ctr = ["ctr", f"--address={CONTAINERD_SOCK}", "-n", "k8s.io"]
    tasks = run(*ctr, "tasks", "ls", "-q", check=False).split()
    for task in tasks:
        subprocess.run([*ctr, "tasks", "kill", "-a", "-s", "SIGKILL", task], capture_output=True)
    deadline = time.monotonic() + 30
    for task in tasks:
        while time.monotonic() < deadline:
            if subprocess.run([*ctr, "tasks", "delete", task], capture_output=True).returncode == 0:
                break
            time.sleep(0.5)


def _kill_netns_processes(only: str | None = None) -> None:
    """Every process in the cluster's namespace is the cluster's: components, shims, and
    what host-network pods run (the agent and its VMMs); `only`: those of that name."""

    def pids() -> list[int]:
        found = [int(p) for p in run("ip", "netns", "pids", NETNS, check=False).split()]
        return [p for p in found if only is None or _comm(p) == only]

    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        for pid in pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and pids():
            time.sleep(0.2)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["up", "down", "discover"])
    args = parser.parse_args()
    if args.action == "discover":
        discover(str(kube_assets() / "kubectl"))
    try:
        return up() if args.action == "up" else down()
    except ClusterError as exc:
        say(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
