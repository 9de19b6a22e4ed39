#!/usr/bin/env bash
# The Debian base that the images (build-images.sh) and the seed guide's guests
# (build-debian-vm-root.sh) start from: debootstrap's minimal variant with the sources of
# the official image, as a tarball. Built once and cached; prints its path on stdout
# (progress goes to stderr). Needs root and debootstrap (hack/install-system-deps.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

out="${ZM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zmachine-operator}/images"
tarball="$out/debian-${DEBIAN_SUITE}-minbase.tar"
mkdir -p "$out"
exec 9>"$tarball.lock"
flock 9
if [[ ! -s "$tarball" ]]; then
  echo "[debian-base] debootstrap ${DEBIAN_SUITE} (minbase; a few minutes)" >&2
  rootfs="$(mktemp -d "$out/rootfs.XXXXXX")"
  trap 'rm -rf --one-file-system "$rootfs"' EXIT
  debootstrap --variant=minbase "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR" >&2
  # The sources of the official image: the release, its updates and security fixes.
  cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $DEBIAN_MIRROR $DEBIAN_SUITE main
deb $DEBIAN_MIRROR $DEBIAN_SUITE-updates main
deb http://deb.debian.org/debian-security $DEBIAN_SUITE-security main
SOURCES
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi
echo "$tarball"
