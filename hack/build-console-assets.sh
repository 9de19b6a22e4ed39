#!/usr/bin/env bash
# Copies the console page's xterm.js (+ fit addon) into controller/console/static/vendor,
# from the npm registry at the versions package-lock.json pins (npm ci checks each
# tarball's integrity hash). The copies are build output (gitignored), never committed.
# Cached: a no-op while the lock file is older than the copies. Prints the vendor dir.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
web=$root/controller/console/web
vendor=$root/controller/console/static/vendor
stamp=$vendor/.lock
if [[ -f $stamp && $stamp -nt $web/package-lock.json ]]; then
  echo "$vendor"
  exit 0
fi
command -v npm >/dev/null || { echo "[console-assets] npm missing: run hack/install-system-deps.sh" >&2; exit 1; }
echo "[console-assets] npm ci (xterm.js, pinned by package-lock.json)" >&2
(cd "$web" && npm ci --ignore-scripts --no-audit --no-fund >&2)
rm -rf "$vendor" && mkdir -p "$vendor"
cp "$web/node_modules/@xterm/xterm/lib/xterm.js" "$web/node_modules/@xterm/xterm/css/xterm.css" \
   "$web/node_modules/@xterm/addon-fit/lib/addon-fit.js" "$vendor/"
cp "$web/package-lock.json" "$stamp"
echo "$vendor"
