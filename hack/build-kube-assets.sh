#!/usr/bin/env bash
# Builds kube-apiserver, kubectl and etcd from their Go modules into a cache
# directory, the same layout envtest expects in KUBEBUILDER_ASSETS.
# Prints the directory on stdout; progress goes to stderr.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${ZM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zmachine-operator}"
out="$cache_root/kube-assets/k8s-${KUBERNETES_VERSION}-etcd-${ETCD_VERSION}"
if [[ -x "$out/kube-apiserver" && -x "$out/kubectl" && -x "$out/etcd" ]]; then
  echo "$out"
  exit 0
fi
mkdir -p "$out"
log() { echo "[kube-assets] $*" >&2; }
export GOFLAGS="-trimpath" CGO_ENABLED=0

build_kubernetes() {
  local work="$cache_root/build/kubernetes-${KUBERNETES_VERSION}"
  mkdir -p "$work"
  log "fetching k8s.io/kubernetes ${KUBERNETES_VERSION} module metadata"
  local gomod
  gomod="$(cd "$work" && go mod download -json "k8s.io/kubernetes@${KUBERNETES_VERSION}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  # k8s.io/kubernetes points its staging modules at ./staging; as a dependency
  # those replaces are ignored, so pin each to the matching v0.x release.
  local staging_version="v0${KUBERNETES_VERSION#v1}"
  {
    echo "module zmachine-operator/kube-assets"
    echo
    echo "go 1.26.0"
    echo
    echo "require k8s.io/kubernetes ${KUBERNETES_VERSION}"
    echo
    echo "replace ("
    grep -E '=> \./staging/src/' "$gomod" | awk -v v="$staging_version" '{print "\t" $1 " => " $1 " " v}'
    echo ")"
  } >"$work/go.mod"
  cat >"$work/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  log "resolving dependencies (go mod tidy)"
  (cd "$work" && go mod tidy -e >&2)
  for cmd in kube-apiserver kubectl; do
    log "building $cmd (several minutes on 2 cores)"
    (cd "$work" && go build -v -o "$out/$cmd" "k8s.io/kubernetes/cmd/$cmd" 2>&1 | awk '{n++; if (n % 200 == 0) printf "[kube-assets]   %d packages compiled\n", n > "/dev/stderr"}')
    [[ -x "$out/$cmd" ]] || { log "building $cmd failed"; exit 1; }
  done
}

build_etcd() {
  local work="$cache_root/build/etcd-${ETCD_VERSION}"
  mkdir -p "$work"
  cp "$here/etcd/main.go" "$work/main.go"
  printf 'module zmachine-operator/etcd\n\ngo 1.26.0\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" >"$work/go.mod"
  log "resolving etcd ${ETCD_VERSION}"
  (cd "$work" && go mod tidy >&2)
  log "building etcd"
  (cd "$work" && go build -o "$out/etcd" . >&2)
}

[[ -x "$out/etcd" ]] || build_etcd
[[ -x "$out/kube-apiserver" && -x "$out/kubectl" ]] || build_kubernetes
log "ready in $out"
echo "$out"
