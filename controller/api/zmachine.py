"""The Zmachine custom resource: spec and status, the source of the CRD schema."""

from __future__ import annotations

import enum
from typing import Annotated

from pydantic import ConfigDict, Field

from controller.api.base import (
    KubeModel,
    Quantity,
    list_map,
    quantity_bytes_cel,
    quantity_valid_cel,
    rule,
    validations,
)

GROUP = "zos.threefold.io"
VERSION = "v1alpha1"
KIND = "Zmachine"
PLURAL = "zmachines"

MIB = 1024 * 1024
GIB = 1024 * MIB
MIN_MEMORY = "250Mi"
RESERVED_NETWORKS = ("ygg", "pub", "mycelium")

ShellName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)]
# Volume names become virtio-fs tags, which the guest kernel limits to 36 bytes.
VolumeName = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=36)]


class RestartPolicy(enum.StrEnum):
    ALWAYS = "Always"
    ON_FAILURE = "OnFailure"
    NEVER = "Never"


class Phase(enum.StrEnum):
    PENDING = "Pending"
    SCHEDULED = "Scheduled"
    PROVISIONING = "Provisioning"
    RUNNING = "Running"
    PAUSED = "Paused"
    STOPPED = "Stopped"
    FAILED = "Failed"
    TERMINATING = "Terminating"
    UNKNOWN = "Unknown"


class BootMode(enum.StrEnum):
    CONTAINER = "container"
    VM = "vm"
    IMAGE = "image"


class ComputeCapacity(KubeModel):
    """Virtual CPUs and memory of the machine."""

    cpu: Annotated[int, Field(ge=1, le=256)]
    """Number of virtual CPUs, 1 to 256."""

    memory: Annotated[
        Quantity,
        Field(
            json_schema_extra=validations(
                rule(quantity_valid_cel("self"), "memory must be a quantity such as 1Gi or 512Mi"),
                rule(
                    f"!{quantity_valid_cel('self')} || "
                    f"{quantity_bytes_cel('self')} >= quantity('{MIN_MEMORY}').asInteger()",
                    f"memory must be at least {MIN_MEMORY}",
                ),
            )
        ),
    ]
    """Guest memory as a Kubernetes quantity, at least 250Mi."""


class SecretKeyRef(KubeModel):
    """A key of a Secret in the Zmachine's namespace."""

    name: Annotated[str, Field(min_length=1, max_length=253)]
    """Name of the Secret."""
    key: Annotated[str, Field(min_length=1, max_length=253)]
    """Key inside the Secret."""


class EnvSource(KubeModel):
    """Where a variable's value comes from."""

    secret_key_ref: SecretKeyRef
    """Take the value from a key of a Secret."""


class EnvVar(KubeModel):
    """An environment variable for the entrypoint (container modes)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            rule(
                "has(self.value) != has(self.valueFrom)",
                "exactly one of value and valueFrom must be set",
            )
        )
    )

    name: ShellName
    """Variable name, valid as a shell variable."""
    value: str | None = None
    """Literal value."""
    value_from: EnvSource | None = None
    """Value taken from a Secret."""


class DiskSource(KubeModel):
    """A raw block device attached to the machine, formatted on first use in container modes."""

    size: Quantity
    """Size of the disk."""


class VolumeSource(KubeModel):
    """A directory shared into the machine over virtio-fs."""

    size: Quantity
    """Quota of the volume."""


class Volume(KubeModel):
    """Storage for the machine, referenced by name from mounts."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            rule(
                "has(self.disk) != has(self.volume)",
                "a volume is either a disk or a volume, exactly one of the two",
            )
        )
    )

    name: VolumeName
    """Volume name, a DNS label of at most 36 characters."""
    disk: DiskSource | None = None
    """A block device."""
    volume: VolumeSource | None = None
    """A virtio-fs shared directory."""


class Mount(KubeModel):
    """Where a volume appears inside the guest."""

    name: VolumeName
    """Name of a volume of this Zmachine."""
    mount_point: Annotated[
        str,
        Field(
            pattern=r"^/",
            max_length=4096,
            json_schema_extra=validations(
                rule("self != '/'", "mountPoint must not be the root directory /"),
                rule(
                    "!self.split('/').exists(p, p == '..')",
                    "mountPoint must not contain '..'",
                ),
            ),
        ),
    ]
    """Absolute path inside the guest, not /."""


class NetworkInterface(KubeModel):
    """A private network interface."""

    network: Annotated[
        str,
        Field(
            min_length=1,
            max_length=63,
            json_schema_extra=validations(
                rule(
                    f"!({' || '.join(f'self == {n!r}' for n in RESERVED_NETWORKS)})",
                    f"network names {', '.join(RESERVED_NETWORKS)} are reserved",
                )
            ),
        ),
    ]
    """Name of a ZmachineNetwork in the Zmachine's namespace."""
    ip: Annotated[
        str | None,
        Field(
            json_schema_extra=validations(
                rule("isIP(self) && ip(self).family() == 4", "ip must be a valid IPv4 address"),
                rule(
                    "!(self.endsWith('.0') || self.endsWith('.1') || self.endsWith('.255'))",
                    "ip must not end in .0, .1 (the node's gateway) or .255",
                ),
            )
        ),
    ] = None
    """IPv4 address of the interface, inside the subnet of the network on the machine's
    node; assigned at deployment when empty."""


class Mycelium(KubeModel):
    """A mycelium overlay interface."""

    network: Annotated[str, Field(min_length=1, max_length=63)]
    """ZmachineNetwork whose mycelium router the interface joins: the network of the private
    interface. Each node of the network runs one router, with a /64 of its own."""
    hex_seed: Annotated[
        str,
        Field(
            pattern=r"^[0-9a-fA-F]{12}$",
            json_schema_extra=validations(
                rule(
                    "!(self.lowerAscii() in ['000000000000', 'ffffffffffff'])",
                    "hexSeed must not be all zeros or all ones",
                )
            ),
        ),
    ]
    """Six bytes as 12 hex digits: the address is the router's /64, ff0f, then these bytes,
    so the same seed on the same node gives the same address."""


class MachineNetwork(KubeModel):
    """Network attachments of the machine."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            rule(
                "!has(self.mycelium) || (has(self.interfaces) && "
                "self.interfaces.exists(i, i.network == self.mycelium.network))",
                "mycelium.network must be the network of a private interface "
                "(spec.network.interfaces)",
                ".mycelium.network",
            )
        )
    )

    interfaces: Annotated[
        list[NetworkInterface],
        Field(
            max_length=1,
            json_schema_extra=list_map("network"),
        ),
    ] = []
    """Private interfaces; one is supported."""
    planetary: bool = False
    """Attach a Yggdrasil (planetary network) interface."""
    mycelium: Mycelium | None = None
    """Attach a mycelium interface."""
    public_ip: Annotated[bool, Field(alias="publicIP")] = False
    """Attach a public interface with an address of each family a ZmachinePublicIPPool
    has, bridged to the node's public interface; the default route goes through it."""


GpuId = Annotated[
    str,
    Field(
        pattern=r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]/[0-9a-fA-F]{4}/[0-9a-fA-F]{4}$"
    ),
]

_MIN_ROOT_RULE = (
    "!has(self.size) || "
    f"{quantity_bytes_cel('self.size')} == 0 || "
    f"{quantity_bytes_cel('self.size')} >= "
    f"(self.computeCapacity.cpu * {quantity_bytes_cel('self.computeCapacity.memory')} >= {8 * GIB}"
    f" ? {2 * GIB} : {500 * MIB})"
)


class ZmachineSpec(KubeModel):
    """Desired state of a Zmachine."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            rule(
                "!has(self.mounts) || self.mounts.all(m, has(self.volumes) && "
                "self.volumes.exists(v, v.name == m.name))",
                "every mount must name a volume listed in spec.volumes",
                ".mounts",
            ),
            rule(
                f"!has(self.size) || !{quantity_valid_cel('self.size')} || "
                f"!{quantity_valid_cel('self.computeCapacity.memory')} || ({_MIN_ROOT_RULE})",
                "size must be 0 (the minimum) or at least the minimum root size: "
                "2Gi when cpu x memory reaches 8Gi, else 500Mi",
                ".size",
            ),
        )
    )

    flist: Annotated[
        str,
        Field(
            pattern=r"^(https?|file)://[^\s]+\.(fl|flist)$",
            max_length=2048,
        ),
    ]
    """URL of the flist: http(s):// or file://, ending in .fl (rfs v2) or .flist (v1)."""
    compute_capacity: ComputeCapacity
    """Virtual CPUs and memory."""
    size: Annotated[
        Quantity | None,
        Field(
            json_schema_extra=validations(
                rule(quantity_valid_cel("self"), "size must be a quantity such as 10Gi")
            )
        ),
    ] = None
    """Root filesystem size; absent or 0 means the minimum."""
    entrypoint: Annotated[str | None, Field(max_length=4096)] = None
    """Command line started as the guest's init (container modes); /sbin/init when empty."""
    env: Annotated[
        list[EnvVar],
        Field(
            max_length=256,
            json_schema_extra=list_map("name"),
        ),
    ] = []
    """Environment variables for the entrypoint; SSH_KEY installs root's authorized keys."""
    volumes: Annotated[
        list[Volume],
        Field(
            max_length=32,
            json_schema_extra=list_map("name"),
        ),
    ] = []
    """Disks and shared volumes of the machine."""
    mounts: Annotated[
        list[Mount],
        Field(
            max_length=32,
            json_schema_extra=list_map("name"),
        ),
    ] = []
    """Where volumes are mounted inside the guest (container modes)."""
    network: MachineNetwork | None = None
    """Network attachments."""
    gpu: Annotated[
        list[GpuId],
        Field(max_length=8, json_schema_extra={"x-kubernetes-list-type": "set"}),
    ] = []
    """GPUs passed through, as slot/vendor/device, for example 0000:28:00.0/1002/731f."""
    corex: bool = False
    """Replace the entrypoint with the corex remote-access agent."""
    node_name: Annotated[str | None, Field(max_length=253)] = None
    """Pin the machine to this node."""
    node_selector: dict[str, str] = {}
    """Labels a node must carry to run the machine."""
    restart_policy: RestartPolicy = RestartPolicy.ALWAYS
    """What the node does when the machine stops: Always, OnFailure or Never."""
    paused: bool = False
    """Pause the machine's vCPUs while keeping its memory."""


class Condition(KubeModel):
    """A Kubernetes condition."""

    type: str
    status: Annotated[str, Field(pattern=r"^(True|False|Unknown)$")]
    reason: str = ""
    message: str = ""
    last_transition_time: str
    observed_generation: int | None = None


Conditions = Annotated[list[Condition], Field(json_schema_extra=list_map("type"))]


class MetricsSnapshot(KubeModel):
    """Resource usage reported by the node, sampled at most every 30 seconds."""

    cpu_seconds: float = 0.0
    """vCPU time consumed."""
    memory_bytes: int = 0
    """Resident memory of the VMM."""
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    disk_read_bytes: int = 0
    disk_write_bytes: int = 0
    sampled_at: str | None = None
    """When the node took the sample."""


class ZmachineStatus(KubeModel):
    """Observed state of a Zmachine."""

    phase: Phase | None = None
    """Lifecycle phase."""
    conditions: Conditions = []
    """Scheduled, Provisioned, Ready, Paused and NodeReady."""
    node_name: str | None = None
    """Node running the machine."""
    boot_mode: BootMode | None = None
    """container, vm or image, detected from the flist."""
    ip: str | None = None
    """IPv4 address of the private interface."""
    ipv6: str | None = None
    """IPv6 address of the private interface, derived from the IPv4 one."""
    planetary_ip: Annotated[str | None, Field(alias="planetaryIP")] = None
    """Yggdrasil address."""
    mycelium_ip: Annotated[str | None, Field(alias="myceliumIP")] = None
    """Mycelium address."""
    public_ip: Annotated[str | None, Field(alias="publicIP")] = None
    """Public IPv4 address with its prefix length (spec.network.publicIP)."""
    public_ipv6: Annotated[str | None, Field(alias="publicIPv6")] = None
    """Public IPv6 address with its prefix length (spec.network.publicIP)."""
    console_url: Annotated[str | None, Field(alias="consoleURL")] = None
    """API path of the serial console (a websocket through the API server; `kubectl
    zmachine console NAME` uses it)."""
    restart_count: int = 0
    """Times the node restarted the machine."""
    exit_code: int | None = None
    """Exit code of the entrypoint's last run (container mode with an entrypoint)."""
    exit_reason: str | None = None
    """Completed, Error, NotFound (127), NotExecutable (126) or InitError (125)."""
    observed_generation: int | None = None
    """Generation of the spec the status describes."""
    message: str | None = None
    """Last error or notable event, for humans."""
    metrics: MetricsSnapshot | None = None
    """Latest resource usage sample."""
