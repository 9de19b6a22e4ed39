"""The Dockerfiles, parsed and held to what the chart and pyproject.toml expect of them (the
images themselves are built with buildah and run in tests/cluster)."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass

import pytest
import yaml

from tests.charts.helm import CHART, REPO


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def instructions(name: str) -> list[list[Instruction]]:
    """The ARGs before the first FROM, then the instructions of each build stage;
    continuation lines joined and comments dropped."""
    text = (REPO / name).read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    stages: list[list[Instruction]] = [[]]
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(keyword.upper(), " ".join(args.split())))
    return stages


def parse(name: str) -> list[list[Instruction]]:
    """Instructions per build stage."""
    return instructions(name)[1:]


def build_args(name: str) -> dict[str, str]:
    """The ARGs declared before the first FROM, with their defaults."""
    preamble = instructions(name)[0]
    return dict(i.args.partition("=")[::2] for i in preamble if i.keyword == "ARG")


def last(stage: list[Instruction], keyword: str) -> str | None:
    found = [i.args for i in stage if i.keyword == keyword]
    return found[-1] if found else None


SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
IMAGES = {
    "Dockerfile.controller": "zmachine-controller",
    "Dockerfile.agent": "zmachine-agent",
}


@pytest.mark.parametrize("name", IMAGES)
def test_final_image_runs_the_console_script(name: str) -> None:
    script = IMAGES[name]
    final = parse(name)[-1]
    # The base is a build argument (hack/build-images.sh passes a local debootstrap); the
    # published build gets Debian 12, whose python3.11 the Debian-packaged venv is made with.
    assert final[0].args == "${BASE_IMAGE}"
    assert build_args(name)["BASE_IMAGE"] == "debian:bookworm-slim"
    assert all(stage[0].args.startswith("${") for stage in parse(name)), "a base not an ARG"
    entrypoint = json.loads(last(final, "ENTRYPOINT") or "null")
    assert entrypoint == [script], "exec form, so signals reach the process"
    assert script in SCRIPTS, f"{script} is not in [project.scripts]"
    # The console script lands on PATH through the copied virtualenv.
    env = last(final, "ENV") or ""
    assert "PATH=/opt/zmachine/bin:" in env
    assert any(
        i.keyword == "COPY" and i.args.endswith("/opt/zmachine /opt/zmachine") for i in final
    )


@pytest.mark.parametrize("name", IMAGES)
def test_dependencies_are_pinned_by_constraints(name: str) -> None:
    installs = [i.args for stage in parse(name) for i in stage if "pip install" in i.args]
    assert installs and all("-c constraints.txt" in args for args in installs)


def test_controller_runs_as_the_user_the_chart_expects() -> None:
    user = last(parse("Dockerfile.controller")[-1], "USER")
    assert user is not None
    uid, _, gid = user.partition(":")
    values = (CHART / "templates" / "controller-deployment.yaml").read_text()
    assert f"runAsUser: {uid}" in values and f"fsGroup: {gid}" in values
    assert int(uid) != 0


def test_agent_runs_as_root_with_its_host_tools() -> None:
    final = parse("Dockerfile.agent")[-1]
    assert last(final, "USER") in (None, "root", "0")
    assert json.loads(last(final, "CMD") or "null") == ["serve"]
    apt = " ".join(i.args for i in final if "apt-get install" in i.args)
    for package in (
        "qemu-system-x86",
        "qemu-system-common",  # virtiofsd
        "fuse3",
        "iproute2",
        "busybox-static",
        "dosfstools",
        "mtools",
        "python3.11",
        "nftables",  # private networks' NAT
    ):
        assert re.search(rf"(?<![\w-]){re.escape(package)}(?![\w-])", apt), package
    copies = " ".join(i.args for i in final if i.keyword == "COPY")
    assert "/usr/local/bin/wireguard-go" in copies  # found on PATH by the agent
    # The image's guest kernel directory is what the agent reads when the chart sets none.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["agent"]["guestKernelDir"] == ""
    assert "ZMACHINE_AGENT_GUEST_KERNEL_DIR=/usr/share/zmachine-agent/guest" in (
        last(final, "ENV") or ""
    )


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for our simple file: the last matching pattern wins."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.removeprefix("!").rstrip("/")
        if fnmatch.fnmatch(path, glob) or path.startswith(glob + "/"):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("name", IMAGES)
def test_copied_sources_are_in_the_build_context(name: str) -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    for stage in parse(name):
        for copy in (i for i in stage if i.keyword == "COPY" and "--from" not in i.args):
            *sources, _dest = copy.args.split()
            for source in sources:
                source = source.rstrip("/")
                assert (REPO / source).exists(), f"{name}: COPY {source}: no such path"
                assert not _ignored(source, patterns), f"{name}: {source} is in .dockerignore"
