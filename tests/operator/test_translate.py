"""From a Zmachine to the agent's spec: hostnames and Secret roll-outs (no cluster needed:
the Secret reader is a plain function over a dict, standing in for the API's Secrets)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from controller.agent.errors import InvalidSpec
from controller.agent.rpc.convert import spec_from_pb
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.spec import Ref, env_digest, validate_spec
from controller.api.zmachine import ZmachineSpec
from controller.operator.errors import SecretUnavailable
from controller.operator.translate import agent_spec, env_to_deploy

SPEC: dict[str, Any] = {
    "flist": "https://hub.example/busybox.fl",
    "computeCapacity": {"cpu": 1, "memory": "256Mi"},
    "env": [
        {"name": "PLAIN", "value": "x"},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
    ],
}


def secrets(value: str | None) -> Any:
    def read(namespace: str, name: str) -> dict[str, str] | None:
        if value is None or (namespace, name) != ("default", "creds"):
            return None
        return {"token": base64.b64encode(value.encode()).decode()}

    return read


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("web.prod.example.com", "web-prod-example-com"),
        ("Web_1", "web-1"),
        ("a" * 63, "a" * 63),
    ],
)
def test_kubernetes_names_become_valid_hostnames(name: str, expected: str) -> None:
    spec = ZmachineSpec.model_validate(SPEC)
    out = agent_spec(spec, name, {"PLAIN": "x"})
    assert out.hostname == expected
    validate_spec(Ref("default", name, "u-1"), spec_from_pb(out))  # the agent accepts it


def test_long_names_keep_apart_and_fit_a_label() -> None:
    spec = ZmachineSpec.model_validate(SPEC)
    a, b = ("x" * 70 + suffix for suffix in ("-a", "-b"))
    ha, hb = (agent_spec(spec, n, {}).hostname for n in (a, b))
    assert ha != hb and len(ha) <= 63 and len(hb) <= 63
    for name, host in ((a, ha), (b, hb)):
        validate_spec(Ref("default", name, "u-1"), spec_from_pb(agent_spec(spec, name, {})))
        assert host.startswith("x" * 54 + "-")
    with pytest.raises(InvalidSpec, match="hostname"):
        validate_spec(Ref("default", a, "u-1"), spec_from_pb(pb.ZmachineSpec(
            flist=SPEC["flist"], cpu=1, memory_bytes=256 << 20, hostname=a,
        )))  # fmt: skip


def machine(generation: int, env: dict[str, str]) -> pb.Machine:
    return pb.Machine(generation=generation, env_hash=env_digest(env))


def test_a_changed_secret_redeploys_the_same_generation() -> None:
    spec = ZmachineSpec.model_validate(SPEC)
    running = machine(3, {"PLAIN": "x", "TOKEN": "old"})
    assert env_to_deploy(spec, "default", 3, running, secrets("old")) is None
    assert env_to_deploy(spec, "default", 3, running, secrets("new")) == {
        "PLAIN": "x", "TOKEN": "new",
    }  # fmt: skip
    # A Secret gone leaves the running machine alone; a new generation needs it.
    assert env_to_deploy(spec, "default", 3, running, secrets(None)) is None
    with pytest.raises(SecretUnavailable):
        env_to_deploy(spec, "default", 4, running, secrets(None))
    assert env_to_deploy(spec, "default", 4, running, secrets("old")) is not None
    assert env_to_deploy(spec, "default", 1, None, secrets("old")) is not None
