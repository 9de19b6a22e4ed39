#!/usr/bin/env bash
# Builds versitygw (an S3 gateway; its posix backend serves buckets from a directory) from its Go
# module, for the s3:// store tests. Prints the binary's path on stdout; progress goes to stderr.
# Cached: a second run only prints the path.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${ZM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zmachine-operator}"
out="$cache_root/versitygw-${VERSITYGW_VERSION}/versitygw"
if [[ -x "$out" ]]; then
  echo "$out"
  exit 0
fi
log() { echo "[versitygw] $*" >&2; }
export GOFLAGS="-trimpath" CGO_ENABLED=0

mkdir -p "$(dirname "$out")"
log "building versitygw ${VERSITYGW_VERSION} (a few minutes on 2 cores)"
# `go install` of a version builds in module mode with upstream's own go.sum.
GOBIN="$(dirname "$out")/.gobin" go install -ldflags "-s -w" \
  "github.com/versity/versitygw/cmd/versitygw@${VERSITYGW_VERSION}" >&2
# Move into place last, so an interrupted build never looks cached.
mv "$(dirname "$out")/.gobin/versitygw" "$out"
rmdir "$(dirname "$out")/.gobin"
log "ready: $out"
echo "$out"
