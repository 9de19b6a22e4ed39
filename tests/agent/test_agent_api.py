"""The agent's gRPC edge without booting a guest: mTLS, status codes, failed-Deploy cleanup.

Runs the real agent as a subprocess on a loopback port with its own state dir.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from controller.agent.rpc.client import AgentClient
from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.agent.rpc.tls import ClientTLS, write_dev_pki
from controller.agent.runtime.layout import STATE_DIR_MAX
from tests.agent.agent_harness import AgentProcess
from tests.agent.conftest import agent_process

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def flists(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The only directory file:// flists may come from (--flist-dir)."""
    return tmp_path_factory.mktemp("api-flists")


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory, agent_pki: Path, agent_guest_dir: Path, flists: Path
) -> Iterator[AgentProcess]:
    state = tmp_path_factory.mktemp("api") / "state"
    proc = agent_process(state, agent_pki, None, agent_guest_dir, flist_dir=flists)
    with proc.running():
        yield proc


def _node_info(address: str, tls: ClientTLS | None) -> pb.NodeInfoResponse:
    async def go() -> pb.NodeInfoResponse:
        async with AgentClient(address, tls, timeout=5) as c:
            return await c.node_info()

    return asyncio.run(go())


def test_mtls_client_with_ca_signed_cert_gets_node_info(agent: AgentProcess) -> None:
    info = _node_info(agent.address, agent.tls)
    assert info.node_name == "test-node"
    assert info.hypervisor == "qemu"
    assert info.hypervisor_version and info.agent_version
    assert not info.hardware_acceleration  # forced TCG
    assert info.capacity.cpu >= 1 and info.capacity.memory_bytes > 0
    assert info.allocatable.memory_bytes == info.capacity.memory_bytes  # nothing deployed


def test_client_without_cert_is_refused(agent: AgentProcess, tmp_path: Path) -> None:
    # Trusts the server but presents no certificate of its own.
    creds = grpc.ssl_channel_credentials(root_certificates=(agent.pki / "ca.crt").read_bytes())

    async def go() -> None:
        async with grpc.aio.secure_channel(agent.address, creds) as ch:
            await ch.unary_unary(
                "/zmachine.agent.v1.AgentService/NodeInfo",
                request_serializer=pb.NodeInfoRequest.SerializeToString,
                response_deserializer=pb.NodeInfoResponse.FromString,
            )(pb.NodeInfoRequest(), timeout=5)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(go())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_cert_from_another_ca_is_refused(agent: AgentProcess, tmp_path: Path) -> None:
    write_dev_pki(tmp_path)  # a different CA with its own client cert
    rogue = ClientTLS(agent.pki / "ca.crt", tmp_path / "client.crt", tmp_path / "client.key")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _node_info(agent.address, rogue)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_is_refused(agent: AgentProcess) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        _node_info(agent.address, None)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def _spec(**overrides: object) -> pb.ZmachineSpec:
    spec = pb.ZmachineSpec(flist="https://hub.invalid/x.fl", cpu=1, memory_bytes=256 << 20)
    for key, value in overrides.items():
        if key == "volumes":
            spec.volumes.extend(value)  # type: ignore[arg-type]
        else:
            setattr(spec, key, value)
    return spec


def _deploy(agent: AgentProcess, uid: str, spec: pb.ZmachineSpec) -> grpc.aio.AioRpcError:
    ref = pb.ZmachineRef(namespace="default", name="bad", uid=uid)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        agent.call("deploy", ref, 1, spec)
    return err.value


@pytest.mark.parametrize(
    ("uid", "spec", "field"),
    [
        ("../../etc", _spec(), "ref.uid"),
        ("u1", _spec(flist="ftp://hub/x.fl"), "spec.flist"),
        ("u2", _spec(volumes=[pb.Volume(name="../x", kind=pb.VOLUME_KIND_SHARE)]), "volumes[0]"),
        ("u3", _spec(memory_bytes=1 << 20), "spec.memory"),
        ("u4", _spec(cpu=0), "spec.cpu"),
        ("u5", _spec(flist="file:///etc/passwd"), "allowed for file:// flists"),
        ("u6", _spec(size_bytes=100 << 20), "spec.size 100Mi is below the minimum root size 500Mi"),
    ],
)
def test_invalid_specs_are_refused_naming_the_field(
    agent: AgentProcess, uid: str, spec: pb.ZmachineSpec, field: str
) -> None:
    err = _deploy(agent, uid, spec)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.details() or "")
    assert not (agent.state_dir / "vms" / uid).exists()


def _failed_provisioning(agent: AgentProcess, uid: str, spec: pb.ZmachineSpec) -> pb.Machine:
    """Deploy answers at once (Provisioning); the failure shows through Get: FAILED with
    reason ProvisionFailed and the cause, everything on the host undone, the record kept
    until Delete."""
    ref = pb.ZmachineRef(namespace="default", name="bad", uid=uid)
    m = agent.deploy_settled(ref, 1, spec).machine
    assert m.state == pb.MACHINE_STATE_FAILED and m.reason == "ProvisionFailed", m
    assert not (agent.state_dir / "vms" / uid).exists()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(agent.state_dir) not in mounts
    assert not [p for p in Path("/proc").glob("[0-9]*") if uid in _cmdline(p)]
    assert agent.call("delete", uid) is True
    assert not (agent.state_dir / "machines" / f"{uid}.json").exists()
    assert agent.call("list") == []
    return m


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_missing_flist_fails_provisioning_and_leaves_nothing(
    agent: AgentProcess, flists: Path
) -> None:
    m = _failed_provisioning(agent, "u-missing-flist", _spec(flist=f"file://{flists}/missing.fl"))
    assert "flist" in m.message and "missing.fl" in m.message


@pytest.mark.fuse
def test_vmm_failure_late_in_deploy_is_reported_and_cleaned_up(
    agent: AgentProcess, flists: Path
) -> None:
    """A VM-mode flist whose kernel is junk: everything up to the VMM (FUSE mount,
    overlay, seed, virtiofsd) is made, QEMU then refuses the kernel. The provisioning
    must fail with QEMU's reason and undo all of it."""
    from controller.flist.pack import pack

    root = flists / "junk-kernel-root"
    (root / "boot").mkdir(parents=True)
    (root / "boot/vmlinuz").write_bytes(b"this is not a kernel\n" * 64)
    flist = flists / "junk-kernel.fl"
    pack(root, flist, [f"dir://{flists / 'store'}"])
    m = _failed_provisioning(agent, "u-junk-kernel", _spec(flist=f"file://{flist}"))
    assert "default/bad" in m.message and "launch failed" in m.message, m.message
    assert "qemu" in m.message and "kernel" in m.message.lower(), m.message


def test_unknown_uid_is_not_found(agent: AgentProcess) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        agent.call("get", "no-such-uid")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert agent.call("delete", "no-such-uid") is False


def test_insecure_dev_serves_plaintext_on_loopback_only(
    tmp_path_factory: pytest.TempPathFactory, agent_pki: Path
) -> None:
    tmp_path = tmp_path_factory.mktemp("plain")  # short: the state dir has a length budget
    plain = AgentProcess(tmp_path / "state", agent_pki, [], insecure=True)
    plain.start()
    try:
        assert _node_info(plain.address, None).agent_version
    finally:
        plain.stop()
    refused = subprocess.run(
        [sys.executable, "-m", "controller.agent.main", "serve", "--insecure-dev",
         "--listen", "0.0.0.0:0", "--state-dir", str(tmp_path / "s2")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "only on loopback" in refused.stderr


def test_a_state_dir_too_deep_for_vm_sockets_is_refused_at_start() -> None:
    deep = Path("/tmp/zm-deep") / ("d" * (STATE_DIR_MAX + 1 - len("/tmp/zm-deep/")))
    refused = subprocess.run(
        [sys.executable, "-m", "controller.agent.main", "serve", "--insecure-dev",
         "--listen", "127.0.0.1:0", "--state-dir", str(deep)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert f"--state-dir {deep} is {STATE_DIR_MAX + 1} bytes long" in refused.stderr
    assert not deep.exists()
