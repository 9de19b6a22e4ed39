#!/usr/bin/env bash
# Builds the stand-in VMM (tests/bench/standin_vmm.c: answers cloud-hypervisor's API, runs
# no guest) for the tests and the scale benchmark, into the shared cache. Prints the
# binary's path on stdout; progress goes to stderr. Cached by the hash of the source and
# the compiler flags: a second run only prints the path, an edit of the source builds anew.
# Needs gcc and libc6-dev (hack/install-system-deps.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="$here/../tests/bench/standin_vmm.c"
# Static: one stand-in per VM, thousands at once; without the dynamic loader's relocations
# each holds about 60 KiB of private memory instead of 100, and starts sooner.
flags=(-std=c11 -O2 -Wall -Wextra -Werror -static -s)

cache_root="${ZM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zmachine-operator}"
hash="$( { cat "$src"; echo "${flags[*]}"; } | sha256sum | cut -c1-16)"
out="$cache_root/standin-vmm-$hash/standin-vmm"
if [[ -x "$out" ]]; then
  echo "$out"
  exit 0
fi
log() { echo "[standin-vmm] $*" >&2; }
command -v gcc >/dev/null || { log "gcc not found: run hack/install-system-deps.sh"; exit 1; }
mkdir -p "$(dirname "$out")"
log "building $out"
# Build to a temporary name so an interrupted build never looks cached.
gcc "${flags[@]}" -o "$out.tmp" "$src" >&2
# Written back now: a binary still dirty in the page cache counts as every process's
# Private_Dirty in /proc/PID/smaps, which would skew the benchmark's memory figures.
sync "$out.tmp"
mv "$out.tmp" "$out"
log "ready: $out"
echo "$out"
