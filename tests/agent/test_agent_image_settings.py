"""A container image's run settings, kept by ``zmachine-flist pack`` in flist tags, are what the
agent runs when the Zmachine names no entrypoint, in the image's working directory; the image's
env sits under the spec's.
Real guests (QEMU/TCG) from a ``docker save`` archive packed here."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from controller.agent.rpc.proto.zmachine.agent.v1 import agent_pb2 as pb
from controller.flist.archive import pack_source
from tests.agent.agent_harness import AgentProcess
from tests.agent.test_agent_vm import wait_for

pytestmark = [pytest.mark.fuse, pytest.mark.qemu, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def image_flist(agent_busybox_flist: Path) -> Path:
    """The busybox root as a one-layer ``docker save`` archive whose config says what to run."""
    base = agent_busybox_flist.parent  # the agent's --flist-dir
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        tar.add(base / "rootfs", arcname=".")
    config = {
        "config": {
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo image-says=$GREETING/$OTHER in $(pwd); sleep 600"],
            "Env": ["GREETING=from-image", "OTHER=kept"],
            # Not in the root: created at start, as container runtimes do.
            "WorkingDir": "/srv/work",
        }
    }
    archive = base / "image.tar"
    with tarfile.open(archive, "w") as tar:
        files = {
            "layer/layer.tar": layer.getvalue(),
            "config.json": json.dumps(config).encode(),
            "manifest.json": json.dumps(
                [{"Config": "config.json", "Layers": ["layer/layer.tar"]}]
            ).encode(),
        }
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    flist = base / "image.fl"
    pack_source(archive, flist, [f"dir://{base / 'image-store'}"])
    return flist


@pytest.fixture(scope="module")
def agent(agent_strict: AgentProcess) -> AgentProcess:
    return agent_strict


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "image-says=from-image/kept in /srv/work"),
        ({"GREETING": "from-spec"}, "image-says=from-spec/kept in /srv/work"),
    ],
)
def test_the_image_entrypoint_and_env_run_when_the_spec_leaves_them_out(
    agent: AgentProcess, image_flist: Path, env: dict[str, str], expected: str
) -> None:
    uid = f"img-{len(env)}-{os.getpid()}"
    ref = pb.ZmachineRef(namespace="default", name=f"img{len(env)}", uid=uid)
    spec = pb.ZmachineSpec(flist=f"file://{image_flist}", cpu=1, memory_bytes=256 << 20, env=env)
    deployed = agent.deploy_settled(ref, 1, spec)
    assert isinstance(deployed, pb.DeployResponse)
    console = Path(deployed.machine.console_log)
    wait_for(expected, lambda: expected in console.read_text(), timeout=240)
    assert agent.call("delete", uid) is True
