#!/usr/bin/env bash
# Builds wireguard-go (the userspace WireGuard the agent runs per private network, since
# nodes need no wireguard kernel module) from its Go module into the shared cache.
# Prints the binary's path on stdout; progress goes to stderr. Cached: a second run only
# prints the path.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${ZM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zmachine-operator}"
out="$cache_root/wireguard-go-${WIREGUARD_GO_VERSION}/wireguard-go"
if [[ -x "$out" ]]; then
  echo "$out"
  exit 0
fi
log() { echo "[wireguard-go] $*" >&2; }
export GOFLAGS="-trimpath" CGO_ENABLED=0

work="$cache_root/build/wireguard-go-${WIREGUARD_GO_VERSION}"
mkdir -p "$work" "$(dirname "$out")"
printf 'module zmachine-operator/wireguard-go\n\ngo 1.26.0\n\nrequire golang.zx2c4.com/wireguard %s\n' \
  "$WIREGUARD_GO_VERSION" >"$work/go.mod"
cat >"$work/tools.go" <<'GO'
//go:build tools

package tools

import _ "golang.zx2c4.com/wireguard"
GO
log "resolving wireguard-go ${WIREGUARD_GO_VERSION} (go mod tidy)"
(cd "$work" && go mod tidy >&2)
log "building wireguard-go"
# Build to a temporary name so an interrupted build never looks cached.
(cd "$work" && go build -ldflags "-s -w" -o "$out.tmp" golang.zx2c4.com/wireguard >&2)
mv "$out.tmp" "$out"
log "ready: $out"
echo "$out"
