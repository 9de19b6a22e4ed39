#!/usr/bin/env bash
# Builds the two guests of the seed's guide test (tests/e2e/test_seed_guide.py), following
# docs/flist.md "From a root filesystem to a running Zmachine" with Debian 12:
#
#   $ZM_CACHE/debian-vm-root/<suite>-<version>/root/          a VM-mode root: systemd,
#       linux-image-amd64 with /boot/vmlinuz and /boot/initrd.img, virtiofs in the initramfs,
#       cloud-init, openssh-server
#   $ZM_CACHE/debian-vm-root/<suite>-<version>/app-image.tar  a `docker save` archive of a small
#       container-mode image (the Debian minbase + openssh-server, built with buildah) whose
#       entrypoint and working directory come from its image config
#
# and prints that directory on stdout (progress goes to stderr). Cached: bump VERSION when
# the recipe changes; a finished directory is never rebuilt. Needs root, debootstrap and
# buildah (hack/install-system-deps.sh) and the Debian archive.
set -euo pipefail

VERSION=2 # the recipe below; a new value builds a new directory beside the old one
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
SUITE=$DEBIAN_SUITE
IMAGE_REF=localhost/zmachine-seed-guide-app:$SUITE-$VERSION

cache=${ZM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zmachine-operator}
dest=$cache/debian-vm-root/$SUITE-$VERSION
log() { echo "[debian-vm-root] $*" >&2; }
die() { echo "[debian-vm-root] error: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "needs root (debootstrap, chroot)"
for tool in debootstrap buildah unshare; do
  command -v "$tool" >/dev/null || die "$tool missing (run hack/install-system-deps.sh)"
done

mkdir -p "$dest"
exec 9>"$dest/.lock"
flock 9
if [[ -f $dest/.done ]]; then
  log "up to date: $dest"
  echo "$dest"
  exit 0
fi

work=$(mktemp -d "$dest/build.XXXXXX")
trap 'rm -rf --one-file-system "$work"' EXIT
started=$SECONDS

# The Debian base both guests start from (debootstrap's minimal variant), shared with the
# images' base.
mkdir "$work/base"
tar -C "$work/base" -xf "$(bash "$here/debian-base.sh")"

# Runs a shell script in the chroot $1 with /proc, /sys and /dev mounted in a private mount
# namespace: the mounts go with the namespace, even when the script fails.
in_chroot() {
  unshare --mount --propagation private -- bash -euo pipefail -c '
    root=$1; script=$2
    mount -t proc proc "$root/proc"
    mount -t sysfs sys "$root/sys"
    mount --rbind /dev "$root/dev"
    cp /etc/resolv.conf "$root/etc/resolv.conf"  # the host'"'"'s, for apt; never kept
    trap ": >\"\$root/etc/resolv.conf\"" EXIT
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
      chroot "$root" /bin/bash -euo pipefail -c "$script"
  ' in_chroot "$1" "$2" >&2
}

# Common to both guests: no daemon starts inside the chroot, nothing cached is kept, and
# each machine makes its own SSH host keys (cloud-init in VM mode, the initramfs otherwise).
apt_install() { # root, packages...
  local root=$1
  shift
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 0755 "$root/usr/sbin/policy-rc.d"
  in_chroot "$root" "apt-get update -q && apt-get install -y -q --no-install-recommends $*"
  rm -f "$root/usr/sbin/policy-rc.d" "$root"/etc/ssh/ssh_host_*
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
}

log "VM root: kernel, initramfs with virtiofs, cloud-init, openssh-server"
cp -a "$work/base" "$work/root"
# zos boots /boot/vmlinuz and /boot/initrd.img; Debian's kernel hooks keep those links
# (relative, inside the root) current across kernel upgrades when told to put them in /boot.
printf 'do_symlinks = yes\nlink_in_boot = yes\n' >"$work/root/etc/kernel-img.conf"
apt_install "$work/root" systemd-sysv linux-image-amd64 initramfs-tools cloud-init \
  openssh-server ifupdown iproute2 netbase locales
# cloud-init's locale module sets en_US.UTF-8 and fails (status: error) if it is not generated.
sed -i 's/^# *\(en_US.UTF-8 UTF-8\)/\1/' "$work/root/etc/locale.gen"
in_chroot "$work/root" "locale-gen"
# The guide's step: virtiofs in the initramfs (the root is a virtio-fs share named vroot).
echo virtiofs >>"$work/root/etc/initramfs-tools/modules"
# Kernel interface names (eth0, ...): the seed names its interfaces ethN (matched by MAC),
# and Debian's cloud-init renders them for ifupdown, by name. Masking systemd's naming
# policy (here and, by the update below, in the initramfs) keeps those names.
mkdir -p "$work/root/etc/systemd/network"
ln -sf /dev/null "$work/root/etc/systemd/network/99-default.link"
in_chroot "$work/root" "update-initramfs -u -k all"
# The seed is a NoCloud disk; skipping the other datasources' probes saves a slow boot.
cat >"$work/root/etc/cloud/cloud.cfg.d/90_zmachine.cfg" <<'CFG'
datasource_list: [NoCloud, None]
CFG
rm -f "$work/root/etc/hostname" "$work/root/etc/machine-id"
: >"$work/root/etc/machine-id"
[[ -L $work/root/boot/vmlinuz && -L $work/root/boot/initrd.img ]] ||
  die "the kernel package made no /boot/vmlinuz and /boot/initrd.img links"
grep -qx virtiofs "$work/root/etc/initramfs-tools/modules" || die "virtiofs not in the modules"

log "container image $IMAGE_REF: minbase + openssh-server, entrypoint and workdir in its config"
cp -a "$work/base" "$work/app"
apt_install "$work/app" openssh-server
mkdir -p "$work/app/srv/app"
# The entrypoint leaves proof of the directory it started in, then serves SSH.
cat >"$work/app/srv/app/start" <<'START'
#!/bin/sh
pwd >/run/entrypoint-cwd
mkdir -p /run/sshd
exec /usr/sbin/sshd -D -e
START
chmod 0755 "$work/app/srv/app/start"
tar -C "$work/app" -cf "$work/app.tar" .
export BUILDAH_ISOLATION=chroot
ctr=$(buildah from scratch)
buildah add --quiet "$ctr" "$work/app.tar" / >/dev/null
buildah config --workingdir /srv/app --entrypoint '["/srv/app/start"]' \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
buildah commit --quiet --rm "$ctr" "$IMAGE_REF" >/dev/null
buildah push --quiet "$IMAGE_REF" "docker-archive:$work/app-image.tar:$IMAGE_REF" >&2
buildah rmi "$IMAGE_REF" >/dev/null

rm -rf "$dest/root" "$dest/app-image.tar"
mv "$work/root" "$dest/root"
mv "$work/app-image.tar" "$dest/app-image.tar"
touch "$dest/.done"
log "done in $((SECONDS - started))s: root $(du -sh "$dest/root" | cut -f1), image $(du -h "$dest/app-image.tar" | cut -f1)"
echo "$dest"
