#!/usr/bin/env bash
# Builds the Kubernetes binaries from their Go modules into a cache directory.
#   build-kube-assets.sh        kube-apiserver, kubectl and etcd: the layout envtest expects
#                               in KUBEBUILDER_ASSETS (the tests' control plane)
#   build-kube-assets.sh node   kubelet, kube-controller-manager, kube-scheduler, kube-proxy: the rest
#                               of a real node (`make cluster`), from the same pinned module
# Prints the directory on stdout; progress goes to stderr.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${ZM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zmachine-operator}"
case "${1:-control-plane}" in
  control-plane)
    out="$cache_root/kube-assets/k8s-${KUBERNETES_VERSION}-etcd-${ETCD_VERSION}"
    kube_cmds=(kube-apiserver kubectl)
    work="$cache_root/build/kubernetes-${KUBERNETES_VERSION}"
    ;;
  node)
    out="$cache_root/kube-node/k8s-${KUBERNETES_VERSION}"
    kube_cmds=(kubelet kube-controller-manager kube-scheduler kube-proxy)
    # Its own module directory, so a node build never rewrites the control plane's go.sum
    # while a test builds from it; both share Go's build cache.
    work="$cache_root/build/kubernetes-node-${KUBERNETES_VERSION}"
    ;;
  *) echo "usage: $0 [control-plane|node]" >&2; exit 2 ;;
esac
want_etcd=$([[ "${1:-control-plane}" == control-plane ]] && echo 1 || echo 0)

have_all() {
  local cmd
  for cmd in "${kube_cmds[@]}"; do [[ -x "$out/$cmd" ]] || return 1; done
  [[ $want_etcd == 0 || -x "$out/etcd" ]]
}
if have_all; then
  echo "$out"
  exit 0
fi
mkdir -p "$out"
log() { echo "[kube-assets] $*" >&2; }
export GOFLAGS="-trimpath" CGO_ENABLED=0

build_kubernetes() {
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
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "${kube_cmds[@]}"
    printf ')\n'
  } >"$work/tools.go"
  log "resolving dependencies (go mod tidy)"
  (cd "$work" && go mod tidy -e >&2)
  local cmd
  for cmd in "${kube_cmds[@]}"; do
    [[ -x "$out/$cmd" ]] && continue
    log "building $cmd (several minutes on 2 cores)"
    # Build to a temporary name so an interrupted build never looks cached.
    (cd "$work" && go build -v -o "$out/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd" 2>&1 | awk '{n++; if (n % 200 == 0) printf "[kube-assets]   %d packages compiled\n", n > "/dev/stderr"}')
    [[ -x "$out/$cmd.tmp" ]] || { log "building $cmd failed"; exit 1; }
    mv "$out/$cmd.tmp" "$out/$cmd"
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

[[ $want_etcd == 0 || -x "$out/etcd" ]] || build_etcd
have_all || build_kubernetes
log "ready in $out"
echo "$out"
