"""From a Zmachine's spec to the agent's DeployRequest spec (secrets resolved here)."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Sequence

from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.spec import env_digest, hostname_label
from controller.api.zmachine import RestartPolicy, ZmachineSpec
from controller.operator.errors import SecretUnavailable, UnsupportedSpec
from controller.operator.inventory import quantity_bytes

# (namespace, secret name) -> the Secret's data (base64 values), or None when absent.
SecretReader = Callable[[str, str], dict[str, str] | None]

_POLICY = {
    RestartPolicy.ALWAYS: pb.RESTART_POLICY_ALWAYS,
    RestartPolicy.ON_FAILURE: pb.RESTART_POLICY_ON_FAILURE,
    RestartPolicy.NEVER: pb.RESTART_POLICY_NEVER,
}


def refuse_unsupported(spec: ZmachineSpec) -> None:
    """Fields admission accepts but the agents cannot honour yet: say so, never drop them."""
    asked = []
    if spec.gpu:
        asked.append("spec.gpu (GPU passthrough)")
    if spec.corex:
        asked.append("spec.corex")
    if asked:
        raise UnsupportedSpec(f"not supported by the node agents yet: {', '.join(asked)}")


def resolve_env(spec: ZmachineSpec, namespace: str, read_secret: SecretReader) -> dict[str, str]:
    env: dict[str, str] = {}
    for i, var in enumerate(spec.env):
        if var.value is not None:
            env[var.name] = var.value
            continue
        assert var.value_from is not None  # admission: exactly one of the two
        ref = var.value_from.secret_key_ref
        data = read_secret(namespace, ref.name)
        where = f"spec.env[{i}].valueFrom.secretKeyRef"
        if data is None:
            raise SecretUnavailable(f"{where}: Secret {namespace}/{ref.name} does not exist")
        if ref.key not in data:
            raise SecretUnavailable(f"{where}: Secret {namespace}/{ref.name} has no key {ref.key}")
        env[var.name] = base64.b64decode(data[ref.key]).decode()
    return env


def env_to_deploy(
    spec: ZmachineSpec,
    namespace: str,
    generation: int,
    machine: pb.Machine | None,
    read_secret: SecretReader,
) -> dict[str, str] | None:
    """The resolved env when the machine must be (re)deployed, else None.

    A new generation always deploys (a missing Secret raises SecretUnavailable). At the
    deployed generation, a machine whose env refers to Secrets is redeployed when a value
    changed (the agent reports the digest of the env it runs with); a Secret gone or
    unreadable then leaves the running machine alone rather than failing it.
    """
    if machine is None or machine.generation < generation:
        return resolve_env(spec, namespace, read_secret)
    if not machine.env_hash or not any(v.value_from is not None for v in spec.env):
        return None
    try:
        env = resolve_env(spec, namespace, read_secret)
    except SecretUnavailable:
        return None
    return env if env_digest(env) != machine.env_hash else None


def agent_spec(
    spec: ZmachineSpec,
    name: str,
    env: dict[str, str],
    interfaces: Sequence[pb.NetworkInterface] = (),
    public: pb.PublicInterface | None = None,
) -> pb.ZmachineSpec:
    """`interfaces`: the private interface with its network as placed on the node;
    `public`: the addresses the Zmachine holds from a ZmachinePublicIPPool."""
    volumes = [
        pb.Volume(
            name=v.name,
            kind=pb.VOLUME_KIND_DISK if v.disk else pb.VOLUME_KIND_SHARE,
            size_bytes=quantity_bytes((v.disk or v.volume).size),  # type: ignore[union-attr]
        )
        for v in spec.volumes
    ]
    ssh_keys = [k.strip() for k in re.split(r"[\n,]", env.get("SSH_KEY", "")) if k.strip()]
    return pb.ZmachineSpec(
        flist=spec.flist,
        cpu=spec.compute_capacity.cpu,
        memory_bytes=quantity_bytes(spec.compute_capacity.memory),
        size_bytes=quantity_bytes(spec.size or 0),
        entrypoint=spec.entrypoint or "",
        env=env,
        volumes=volumes,
        mounts=[pb.Mount(name=m.name, mountpoint=m.mount_point) for m in spec.mounts],
        interfaces=interfaces,
        restart_policy=_POLICY[spec.restart_policy],
        paused=spec.paused,
        hostname=hostname_label(name),
        ssh_keys=ssh_keys,
        public=public,
        planetary=bool(spec.network and spec.network.planetary),
        mycelium_seed=spec.network.mycelium.hex_seed.lower()
        if spec.network and spec.network.mycelium
        else "",
    )
