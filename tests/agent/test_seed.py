"""The cidata seed image: contents read back with mtools, and as the initramfs parses them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from controller.agent.errors import InvalidSpec
from controller.agent.guest.seed import (
    Interface,
    Mount,
    Route,
    SeedConfig,
    render,
    ssh_keys_from_env,
    write_seed,
)

REPO = Path(__file__).resolve().parents[2]
SEED_AWK = REPO / "hack/initramfs/seed.awk"

CONFIG = SeedConfig(
    instance_id="default-web-1",
    hostname="web-1",
    interfaces=[
        Interface(
            mac="02:12:34:56:78:90",  # all digits: YAML 1.1 would read it as a number
            addresses=["10.1.2.5/24", "fd00::5/64"],
            gateway4="10.1.2.1",
            routes=[Route("100.64.0.0/16", "10.1.2.1")],
        ),
        Interface(mac="02:AA:BB:CC:DD:EE", addresses=["192.168.7.2/24"]),
    ],
    nameservers=["8.8.8.8", "2001:4860:4860::8888"],
    ssh_keys=["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFake alice@laptop"],
    mounts=[Mount("vdb", "/data"), Mount("vol1", "/srv/vol", "virtiofs")],
    env={"GREETING": 'it\'s a "test" $HOME', "EMPTY": ""},
    entrypoint="/usr/bin/app --name 'hello world' -v",
)


def mread(image: Path, name: str) -> str:
    out = subprocess.run(
        ["mcopy", "-i", str(image), f"::/{name}", "-"], check=True, capture_output=True
    )
    return out.stdout.decode()


def flatten(text: str, tmp_path: Path) -> dict[str, str]:
    """The seed file as /init sees it: busybox awk running hack/initramfs/seed.awk."""
    src = tmp_path / "in.yaml"
    src.write_text(text, encoding="utf-8")
    out = subprocess.run(
        ["busybox", "awk", "-f", str(SEED_AWK), str(src)],
        check=True, capture_output=True, encoding="utf-8",
    )  # fmt: skip
    return dict(line.split("=", 1) for line in out.stdout.splitlines())


def test_image_is_a_cidata_vfat_with_the_four_files(tmp_path: Path) -> None:
    image = write_seed(CONFIG, tmp_path / "seed.img")
    assert image.stat().st_size == 2 << 20
    label = subprocess.run(
        ["mlabel", "-i", str(image), "-s", "::"], check=True, capture_output=True, text=True
    ).stdout
    assert "cidata" in label
    listing = subprocess.run(
        ["mdir", "-i", str(image), "-b", "::/"], check=True, capture_output=True, text=True
    ).stdout.split()
    assert sorted(Path(p).name for p in listing) == [
        "entrypoint",
        "meta-data",
        "network-config",
        "user-data",
        "workdir",
        "zosrc",
    ]
    assert mread(image, "workdir") == "/\n"  # no image working directory: the root's /
    assert mread(image, "meta-data") == render(CONFIG)["meta-data"]
    assert yaml.safe_load(mread(image, "meta-data")) == {
        "instance-id": "default-web-1",
        "local-hostname": "web-1",
    }


def test_network_config_is_netplan_v2_matched_by_mac(tmp_path: Path) -> None:
    net = yaml.safe_load(render(CONFIG)["network-config"])
    assert net["version"] == 2
    eth0, eth1 = net["ethernets"]["eth0"], net["ethernets"]["eth1"]
    assert eth0["match"] == {"macaddress": "02:12:34:56:78:90"}  # a string, not an int
    assert eth0["addresses"] == ["10.1.2.5/24", "fd00::5/64"]
    assert eth0["gateway4"] == "10.1.2.1"
    assert eth0["routes"] == [{"to": "100.64.0.0/16", "via": "10.1.2.1"}]
    assert eth0["nameservers"] == {"addresses": ["8.8.8.8", "2001:4860:4860::8888"]}
    assert eth1["match"] == {"macaddress": "02:aa:bb:cc:dd:ee"}
    assert "nameservers" not in eth1


def test_initramfs_parser_reads_what_seed_writes(tmp_path: Path) -> None:
    files = render(CONFIG)
    net = flatten(files["network-config"], tmp_path)
    assert net["ethernets.eth0.match.macaddress"] == "02:12:34:56:78:90"
    assert net["ethernets.eth0.addresses.1"] == "fd00::5/64"
    assert net["ethernets.eth0.routes.0.to"] == "100.64.0.0/16"
    assert net["ethernets.eth0.nameservers.addresses.1"] == "2001:4860:4860::8888"
    assert net["ethernets.eth1.addresses.0"] == "192.168.7.2/24"
    user = flatten(files["user-data"], tmp_path)
    assert user["users.0.name"] == "root"
    assert user["users.0.ssh_authorized_keys.0"] == CONFIG.ssh_keys[0]
    assert [user[f"mounts.1.{i}"] for i in range(4)] == [
        "vol1",
        "/srv/vol",
        "virtiofs",
        "defaults",
    ]
    assert flatten(files["meta-data"], tmp_path)["local-hostname"] == "web-1"


def test_user_data_is_cloud_config_for_real_cloud_init() -> None:
    text = render(CONFIG)["user-data"]
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    assert data["users"] == [{"name": "root", "ssh_authorized_keys": list(CONFIG.ssh_keys)}]
    assert data["mounts"][0] == ["vdb", "/data", "auto", "defaults", "0", "0"]


def test_zosrc_and_entrypoint_round_trip_through_a_shell(tmp_path: Path) -> None:
    files = render(CONFIG)
    (tmp_path / "zosrc").write_text(files["zosrc"])
    (tmp_path / "entrypoint").write_text(files["entrypoint"])
    # As the init runs them: a fresh "env -i" ash sources both, then prints what the
    # entrypoint would receive.
    script = (
        f". {tmp_path}/zosrc; . {tmp_path}/entrypoint; "
        'printf \'%s\\n\' "$GREETING" "[$EMPTY]" "$#"; printf \'<%s>\\n\' "$@"'
    )
    out = subprocess.run(
        ["env", "-i", "busybox", "sh", "-c", script, "zm-entry", "stale", "args"],
        check=True, capture_output=True, text=True,
    ).stdout.splitlines()  # fmt: skip
    assert out == [
        'it\'s a "test" $HOME',
        "[]",
        "4",
        "</usr/bin/app>",
        "<--name>",
        "<hello world>",
        "<-v>",
    ]


def test_env_names_cannot_reach_the_entrypoint_argv(tmp_path: Path) -> None:
    """zosrc holds exports only: an env var named like a shell or init variable changes
    the entrypoint's environment, never its argv (which lives in its own file)."""
    config = SeedConfig(
        "x", "x", env={"init": "/bin/false", "IFS": "/", "ROOT": "/elsewhere"},
        entrypoint="/bin/echo a/b",
    )  # fmt: skip
    files = render(config)
    assert "set --" not in files["zosrc"] and "export" not in files["entrypoint"]
    (tmp_path / "zosrc").write_text(files["zosrc"])
    (tmp_path / "entrypoint").write_text(files["entrypoint"])
    script = f'. {tmp_path}/zosrc; . {tmp_path}/entrypoint; printf "<%s>" "$@" "$init"'
    out = subprocess.run(
        ["env", "-i", "busybox", "sh", "-c", script], check=True, capture_output=True, text=True
    ).stdout
    assert out == "</bin/echo><a/b></bin/false>"


def test_non_ascii_mountpoints_and_key_comments_survive_the_awk_reader(tmp_path: Path) -> None:
    config = SeedConfig(
        "x", "x", ssh_keys=["ssh-ed25519 AAAAkey josé@café"],
        mounts=[Mount("vdb", "/données/été"), Mount("tag", "/数据", "virtiofs")],
    )  # fmt: skip
    user = flatten(render(config)["user-data"], tmp_path)
    assert user["users.0.ssh_authorized_keys.0"] == "ssh-ed25519 AAAAkey josé@café"
    assert user["mounts.0.1"] == "/données/été"
    assert user["mounts.1.1"] == "/数据"


def test_ssh_keys_from_env_splits_on_newlines_and_commas() -> None:
    assert ssh_keys_from_env("ssh-ed25519 A a@b\n ssh-rsa B c@d ,, \n") == [
        "ssh-ed25519 A a@b",
        "ssh-rsa B c@d",
    ]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (SeedConfig("x", "x", env={"BAD-NAME": "1"}), "BAD-NAME"),
        (SeedConfig("x", "x", entrypoint="/bin/sh -c 'unterminated"), "entrypoint"),
        (SeedConfig("x", "x", interfaces=[Interface("zz:zz", [])]), "interfaces[0].mac"),
        (
            SeedConfig("x", "x", interfaces=[Interface("02:00:00:00:00:01", ["10.0.0.2"])]),
            "prefix length",
        ),
        (SeedConfig("x", "x", mounts=[Mount("vdb", "data")]), "mounts[0].target"),
        (SeedConfig("x", "x", mounts=[Mount("vdb", "/")]), "mounts[0].target"),
        (SeedConfig("x", "x", nameservers=["dns.google"]), "nameservers"),
        (SeedConfig("x", "web 1"), "hostname"),
        (SeedConfig("x", "-web"), "hostname"),
        (SeedConfig("x", "x", workdir="srv/app"), "workdir"),
        (SeedConfig("x", "x", workdir="/srv\n/app"), "workdir"),
    ],
)
def test_invalid_input_names_the_field(config: SeedConfig, message: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec, match=message.replace("[", r"\[").replace("]", r"\]")):
        write_seed(config, tmp_path / "seed.img")
    assert not (tmp_path / "seed.img").exists()


def test_rewrite_replaces_the_image(tmp_path: Path) -> None:
    path = tmp_path / "seed.img"
    write_seed(CONFIG, path)
    write_seed(SeedConfig(instance_id="other", hostname="db-2"), path)
    assert yaml.safe_load(mread(path, "meta-data"))["local-hostname"] == "db-2"
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind
