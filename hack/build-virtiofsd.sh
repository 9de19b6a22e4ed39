#!/usr/bin/env bash
# Builds the Rust virtiofsd (the maintained virtio-fs daemon; the C one shipped
# with QEMU 7.2 is deprecated) from crates.io into the shared cache.
# Prints the binary's path on stdout; progress goes to stderr. Cached: a second
# run only prints the path. Needs libcap-ng-dev and libseccomp-dev
# (hack/install-system-deps.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${ZM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zmachine-operator}"
out="$cache_root/virtiofsd-${VIRTIOFSD_VERSION}/virtiofsd"
if [[ -x "$out" ]]; then
  echo "$out"
  exit 0
fi
log() { echo "[virtiofsd] $*" >&2; }
command -v cargo >/dev/null || { log "cargo not found: install a Rust toolchain"; exit 1; }
work="$cache_root/build/virtiofsd-${VIRTIOFSD_VERSION}"
mkdir -p "$work" "$(dirname "$out")"
log "building virtiofsd ${VIRTIOFSD_VERSION} (several minutes on 2 cores)"
# --locked: the crate's own Cargo.lock, so the build is the one upstream tested.
cargo install --locked --quiet --version "=${VIRTIOFSD_VERSION}" --root "$work" \
  --target-dir "$work/target" virtiofsd >&2
# Install under a temporary name first so an interrupted build never looks cached.
cp "$work/bin/virtiofsd" "$out.tmp"
mv "$out.tmp" "$out"
rm -rf "$work/target"
log "ready: $out"
echo "$out"
