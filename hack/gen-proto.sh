#!/usr/bin/env bash
# Regenerates the agent's gRPC Python code (messages, stubs, .pyi types) from
# controller/agent/rpc/proto/**/*.proto. Usage: hack/gen-proto.sh [OUT_ROOT]
# OUT_ROOT defaults to the repository root; tests pass a temp dir to detect drift.
# The proto is compiled with the repository root as include path so the generated
# imports are `controller.agent.rpc.proto...` and need no sys.path tricks.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
py=${PYTHON:-$root/.venv/bin/python}
cd "$root"
export PATH="$(dirname "$py"):$PATH"  # protoc finds the protoc-gen-mypy plugins here
mapfile -t protos < <(find controller/agent/rpc/proto -name '*.proto' | LC_ALL=C sort)
include=$("$py" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
mkdir -p "$out"
"$py" -m grpc_tools.protoc -I. -I"$include" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  "${protos[@]}"
