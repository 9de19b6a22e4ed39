"""Where a Zmachine's files live under the agent's state dir.

Every host path the agent creates for a VM is derived here from the (validated) uid and
volume names, and checked to stay inside the state dir, so no spec can make the agent
write elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from controller.agent.errors import InvalidSpec

# A unix socket path holds at most 107 bytes (sun_path is 108 with its NUL). A VM's sockets
# are <state>/vms/<uid>/run/<name>; names are short and never carry a volume name (36 bytes
# of name under the default state dir would not fit), so the state dir has a fixed budget.
SUN_PATH_MAX = 107
ROOT_SHARE_SOCKET = "vfs-root.sock"  # the longest socket name (shares are vfs-<index>.sock)
STATE_DIR_MAX = SUN_PATH_MAX - len(f"/vms/{'u' * 36}/run/{ROOT_SHARE_SOCKET}")


def check_state_dir(state_dir: Path) -> None:
    """Refuse a state dir too deep for the VMs' sockets (virtiofsd would refuse to start)."""
    size = len(str(state_dir).encode())
    if size > STATE_DIR_MAX:
        raise InvalidSpec(
            f"--state-dir {state_dir} is {size} bytes long; the VM sockets under it need it "
            f"at most {STATE_DIR_MAX} bytes (a unix socket path holds 107)"
        )


@dataclass(frozen=True)
class VMPaths:
    root: Path  # <state>/vms/<uid>

    @classmethod
    def for_uid(cls, state_dir: Path, uid: str) -> VMPaths:
        vms = (state_dir / "vms").resolve()
        root = (vms / uid).resolve()
        if root.parent != vms:
            raise InvalidSpec(f"uid {uid!r} would place files outside {vms}")
        return cls(root)

    @property
    def lower(self) -> Path:  # the flist, read-only FUSE mount
        return self.root / "lower"

    @property
    def root_image(self) -> Path:  # sparse ext4 of RootSize(): the quota of the root
        return self.root / "rootfs.ext4"

    @property
    def layer(self) -> Path:  # root_image, loop-mounted
        return self.root / "layer"

    @property
    def upper(self) -> Path:  # persistent writable layer; overlayfs wants upper and work
        return self.layer / "upper"  # on one filesystem: both live in the image

    @property
    def work(self) -> Path:
        return self.layer / "work"

    @property
    def old_upper(self) -> Path:  # agents before the root image: a plain dir, moved into it
        return self.root / "upper"

    @property
    def old_work(self) -> Path:
        return self.root / "work"

    @property
    def rootfs(self) -> Path:  # overlay: the guest's /
        return self.root / "rootfs"

    @property
    def run(self) -> Path:  # sockets
        return self.root / "run"

    @property
    def root_share_socket(self) -> Path:
        return self.run / ROOT_SHARE_SOCKET

    def share_socket(self, index: int) -> Path:
        """By the share's place in the spec: its name could overflow the socket path."""
        return self.run / f"vfs-{index}.sock"

    @property
    def seed(self) -> Path:
        return self.root / "seed.img"

    @property
    def console_log(self) -> Path:
        return self.root / "console.log"

    @property
    def vmm_log(self) -> Path:
        return self.root / "vmm.log"

    @property
    def mount_log(self) -> Path:
        return self.root / "mount.log"

    def share_image(self, name: str) -> Path:  # sparse ext4 of the share's size, its quota
        return self.volume(name, disk=False).with_name(f"{name}.ext4")

    def volume(self, name: str, disk: bool) -> Path:
        base = self.root / ("disks" if disk else "shares")
        path = (base / (f"{name}.img" if disk else name)).resolve()
        if path.parent != base.resolve():
            raise InvalidSpec(f"volume name {name!r} would place files outside {base}")
        return path
