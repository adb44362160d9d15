#!/usr/bin/env bash
# Interoperability with an independent gRPC stack: Python grpcio (C-core, BoringSSL) as a
# base GRID client of the sidecar started by `aesp demo`. Installs grpcio if missing.
# Usage: tests/interop/run.sh [path/to/aesp]   (default: target/debug/aesp)
set -euo pipefail
cd "$(dirname "$0")/../.."
AESP=${1:-target/debug/aesp}
[ -x "$AESP" ] || cargo build --locked --bin aesp
python3 -c 'import grpc, grpc_tools' 2>/dev/null || python3 -m pip install -q 'grpcio==1.*' 'grpcio-tools==1.*'
work=$(mktemp -d)
trap 'kill "$demo" 2>/dev/null || true; wait "$demo" 2>/dev/null || true; rm -rf "$work"' EXIT
python3 -m grpc_tools.protoc -Iproto --python_out="$work" --grpc_python_out="$work" \
  altar/adm/v1/adm.proto altar/grid/v1/grid.proto altar/aesp/v1/aesp.proto google/rpc/status.proto
for d in altar altar/adm altar/adm/v1 altar/grid altar/grid/v1 altar/aesp altar/aesp/v1; do touch "$work/$d/__init__.py"; done
"$AESP" demo --dir "$work/certs" >"$work/demo.log" 2>&1 &
demo=$!
for _ in $(seq 1 100); do grep -q 'Serving until Ctrl-C' "$work/demo.log" && break; sleep 0.2; done
grep -q 'Serving until Ctrl-C' "$work/demo.log" || { cat "$work/demo.log"; echo "the demo did not start"; exit 1; }
PYTHONPATH="$work" python3 tests/interop/python_client.py "$work/certs" 8443
