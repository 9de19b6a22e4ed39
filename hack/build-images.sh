#!/usr/bin/env bash
# Builds the controller and agent images here, without a Docker engine or a registry:
# buildah (Debian's) runs Dockerfile.controller and Dockerfile.agent on a Debian 12 base made
# by debootstrap. Writes one docker-archive per image for `ctr images import` and prints their
# directory on stdout; progress goes to stderr. Cached: the base tarball is kept, buildah
# reuses its layers, and an archive is rewritten only when its image changed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${ZM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zmachine-operator}"
out="$cache_root/images"
mkdir -p "$out"
log() { echo "[images] $*" >&2; }
tag="$(awk '/^appVersion:/ {gsub(/"/, "", $2); print $2}' "$repo/charts/zmachine-operator/Chart.yaml")"
base="localhost/zmachine-base:${DEBIAN_SUITE}"
rust="localhost/zmachine-virtiofsd-prebuilt:${VIRTIOFSD_VERSION}"
go="localhost/zmachine-wireguard-go-prebuilt:${WIREGUARD_GO_VERSION}"
# chroot isolation: RUN steps need no OCI runtime or network setup of buildah's own, and
# reach Debian and PyPI through the host's network like any build.
export BUILDAH_ISOLATION=chroot

have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

if ! have_image "$base"; then
  tarball="$(bash "$here/debian-base.sh")"
  log "importing the base as $base"
  ctr="$(buildah from scratch)"
  buildah add --quiet "$ctr" "$tarball" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd /bin/bash "$ctr"
  buildah commit --quiet --rm "$ctr" "$base" >/dev/null
fi

# A stage image for the Dockerfiles' toolchain stages: the base with the binary that the
# stage's hack/build-*.sh (same script, same pin) built on the host already in the stage's
# cache directory, so the stage only prints its path: no toolchain, no download.
prebuilt() { # image, build script, the binary's path in the stage's cache
  have_image "$1" && return
  local binary ctr
  binary="$(bash "$here/$2")"
  log "base + $(basename "$3") from the host's cache as $1"
  ctr="$(buildah from "$base")"
  buildah copy --quiet "$ctr" "$binary" "$3" >/dev/null
  buildah commit --quiet --rm "$ctr" "$1" >/dev/null
}
prebuilt "$rust" build-virtiofsd.sh "/tmp/virtiofsd/virtiofsd-${VIRTIOFSD_VERSION}/virtiofsd"
prebuilt "$go" build-wireguard-go.sh "/tmp/wireguard/wireguard-go-${WIREGUARD_GO_VERSION}/wireguard-go"

# The pod sandbox image of the node's containerd: Kubernetes' own pause.c from the pinned
# module, static, alone in an image (what registry.k8s.io/pause is).
pause="zmachine-operator/pause:${KUBERNETES_VERSION}"
if ! have_image "localhost/$pause"; then
  src="$(cd "$out" && go mod download -json "k8s.io/kubernetes@${KUBERNETES_VERSION}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')/build/pause/linux/pause.c"
  log "building $pause from $src"
  gcc -Os -static -Wall -Werror -DVERSION="${KUBERNETES_VERSION}" -o "$out/pause" "$src"
  ctr="$(buildah from scratch)"
  buildah copy --quiet "$ctr" "$out/pause" /pause >/dev/null
  buildah config --entrypoint '["/pause"]' --user 65535:65535 "$ctr"
  buildah commit --quiet --rm "$ctr" "localhost/$pause" >/dev/null
fi

export_archive() { # image, its name in the archive, archive file: rewritten only on change
  local id
  id="$(buildah inspect --type image --format '{{.FromImageID}}' "$1")"
  if [[ "$(cat "$3.id" 2>/dev/null)" != "$id" ]]; then
    rm -f "$3"
    buildah push --quiet "$1" "docker-archive:$3.tmp:$2" >&2
    mv "$3.tmp" "$3"
    echo "$id" >"$3.id"
  fi
}
export_archive "localhost/$pause" "docker.io/$pause" "$out/pause.tar"
echo "docker.io/$pause" >"$out/pause.ref"

# pip in the build stages trusts what the host trusts (a TLS-inspecting proxy's CA, say):
# the host's bundle and a pip.conf naming it are mounted for the RUN steps only, never kept.
trust=()
if [[ -s /etc/ssl/certs/ca-certificates.crt ]]; then
  printf '[global]\ncert = /run/host-ca.crt\n' >"$out/pip.conf"
  trust=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro -v "$out/pip.conf:/etc/pip.conf:ro")
fi

for component in controller agent; do
  image="zmachine-operator/zmachine-${component}:${tag}"
  log "building $image from Dockerfile.${component}"
  buildah bud --layers --pull-never --quiet "${trust[@]}" \
    --build-arg "BASE_IMAGE=$base" --build-arg "RUST_IMAGE=$rust" --build-arg "GO_IMAGE=$go" \
    -f "$repo/Dockerfile.${component}" -t "localhost/$image" "$repo" >&2
  # docker.io/..., the name containerd and the kubelet give the chart's image reference.
  export_archive "localhost/$image" "docker.io/$image" "$out/zmachine-${component}.tar"
done
log "ready in $out"
echo "$out"
