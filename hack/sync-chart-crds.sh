#!/usr/bin/env bash
# Copies the generated CRDs (crds/, from `make generate`) into the Helm chart, which
# installs them from its own crds/ folder. tests/charts checks that the copies match.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/charts/zmachine-operator/crds"
mkdir -p "$dest"
# Drop copies of CRDs that no longer exist, then copy the current ones.
find "$dest" -maxdepth 1 -name '*.yaml' -delete
cp "$root"/crds/*.yaml "$dest/"
echo "[sync-chart-crds] $(find "$dest" -maxdepth 1 -name '*.yaml' | wc -l) CRDs copied to $dest" >&2
