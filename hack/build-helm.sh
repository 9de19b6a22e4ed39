#!/usr/bin/env bash
# Builds helm from its Go module into the same cache as the kube binaries.
# Prints the binary's path on stdout; progress goes to stderr. Cached: a second
# run only prints the path.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${ZM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zmachine-operator}"
out="$cache_root/helm-${HELM_VERSION}/helm"
if [[ -x "$out" ]]; then
  echo "$out"
  exit 0
fi
log() { echo "[helm] $*" >&2; }
export GOFLAGS="-trimpath" CGO_ENABLED=0

work="$cache_root/build/helm-${HELM_VERSION}"
mkdir -p "$work" "$(dirname "$out")"
printf 'module zmachine-operator/helm\n\ngo 1.26.0\n\nrequire helm.sh/helm/v3 %s\n' "$HELM_VERSION" >"$work/go.mod"
cat >"$work/tools.go" <<'GO'
//go:build tools

package tools

import _ "helm.sh/helm/v3/cmd/helm"
GO
log "resolving helm ${HELM_VERSION} (go mod tidy)"
(cd "$work" && go mod tidy >&2)
log "building helm (a few minutes on 2 cores)"
# The linker variables upstream's Makefile sets: helm's own version, and the Kubernetes
# version `helm template`/`lint` assume (the client-go minor, else they claim v1.20).
k8s_minor="$(cd "$work" && go list -f '{{.Version}}' -m k8s.io/client-go | cut -d. -f2)"
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
for pkg in pkg/lint/rules pkg/chartutil; do
  ldflags+=" -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$k8s_minor"
done
# Build to a temporary name so an interrupted build never looks cached.
(cd "$work" && go build -ldflags "$ldflags" -o "$out.tmp" helm.sh/helm/v3/cmd/helm >&2)
mv "$out.tmp" "$out"
log "ready: $out"
echo "$out"
