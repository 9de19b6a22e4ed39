#!/usr/bin/env bash
# Installs the Debian packages the project needs (idempotent: only missing
# packages are fetched). Run as root; CI and `make run`/`make test` call it.
set -euo pipefail
packages=(
  pkg-config libfuse3-dev fuse3          # pyfuse3 build and the FUSE mounts
  qemu-system-x86 qemu-utils             # guests under TCG, virtiofsd (qemu-system-common)
  busybox-static linux-image-amd64       # container-mode initramfs and kernel
  dosfstools mtools                      # the cidata seed disk (vfat)
  syslinux syslinux-common               # bootable disk images for the image-mode test
  iproute2 bridge-utils                  # bridges, taps and test namespaces
  cpio zstd xz-utils kmod                # initramfs packing and kernel modules
  capnproto                              # capnp encode: builds v1 flists in tests/flist
  e2fsprogs mount                        # root images: mkfs.ext4, resize2fs; mount -o loop, losetup
  util-linux procps openssl              # nsenter, blkid; pgrep in tests; the local control plane's PKI
  libcap-ng-dev libseccomp-dev           # the Rust virtiofsd's build (hack/build-virtiofsd.sh)
  gcc libc6-dev                          # the stand-in VMM's build (hack/build-standin-vmm.sh)
  openssh-client                         # the real ssh-keygen the guest-boot tests put in a root
  nodejs                                 # npm ci of the console page's xterm.js (hack/build-console-assets.sh)
  chromium                               # the console page's browser test (Playwright drives it)
  nftables tcpdump                       # NAT of private networks; the overlay capture test
  yggdrasil                              # planetary NICs: the node's Yggdrasil router
  prometheus                             # promtool (alert rules and their tests); the cluster's Prometheus
  containerd runc containernetworking-plugins  # `make cluster`: the node's runtime and pod network
  iptables conntrack curl                # `make cluster`: kube-proxy's rules; readiness probes
  buildah debootstrap                    # hack/build-images.sh and build-debian-vm-root.sh: images and guests
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Debian ships npm apart from nodejs; other nodejs builds bundle it (and conflict with it).
command -v npm >/dev/null || missing+=(npm)
if ((${#missing[@]} == 0)); then
  echo "[system-deps] all ${#packages[@]} Debian packages present" >&2
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "[system-deps] missing packages: ${missing[*]}; rerun as root" >&2
  exit 1
fi
echo "[system-deps] installing: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >&2
apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
