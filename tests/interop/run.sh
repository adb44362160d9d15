#!/usr/bin/env bash
# Interoperability with an independent gRPC stack: Python grpcio (C-core, BoringSSL) as a
# base GRID client of the sidecar started by `aesp demo`. Installs grpcio if missing.
# Usage: tests/interop/run.sh [path/to/aesp]   (default: target/debug/aesp)
set -euo pipefail
cd "$(dirname "$0")/../.."
AESP=${1:-target/debug/aesp}
[ -x "$AESP" ] || cargo build --locked --bin aesp
python3 -c 'import grpc, grpc_tools' 2>/dev/null || python3 -m pip install -q 'grpcio==1.*' 'grpcio-tools==1.*'
python3 -c 'import cryptography' 2>/dev/null || python3 -m pip install -q 'cryptography'
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

# The audit log of what the client just did, verified by an independent verifier written from
# docs/audit-format.md alone: exported from the live file beside the running writer.
"$AESP" audit export --db "$work/certs/state/audit.redb" --format jsonl --out "$work/audit.jsonl"
"$AESP" audit pubkey --config "$work/certs/sidecar.yaml" > "$work/audit.pub"
python3 tests/interop/verify_audit.py --self-test >/dev/null || { python3 tests/interop/verify_audit.py --self-test; echo "the verifier's self-test failed"; exit 1; }
out=$(python3 tests/interop/verify_audit.py "$work/audit.jsonl" --pubkey "$work/audit.pub") || { echo "$out"; echo "the exported audit log does not verify"; exit 1; }
echo "$out"
case "$out" in OK*) ;; *) echo "the verifier did not say OK"; exit 1;; esac
# A tampered copy (one field of the second record changed) must be reported: exit 1, FAILED.
python3 - "$work/audit.jsonl" "$work/audit-tampered.jsonl" <<'PY'
import json, sys
lines = open(sys.argv[1], encoding="utf-8").read().splitlines()
recs = [i for i, l in enumerate(lines) if l.strip() and json.loads(l).get("type") == "record"]
assert len(recs) >= 2, f"only {len(recs)} audit records"
o = json.loads(lines[recs[1]])
o["decision"] = "DENY" if o["decision"] != "DENY" else "ALLOW"
lines[recs[1]] = json.dumps(o)
open(sys.argv[2], "w", encoding="utf-8").write("\n".join(lines) + "\n")
PY
rc=0
out=$(python3 tests/interop/verify_audit.py "$work/audit-tampered.jsonl" --pubkey "$work/audit.pub") || rc=$?
echo "tampered copy: $out"
[ "$rc" -eq 1 ] && case "$out" in "FAILED at sequence 2: modified record"*) true;; *) false;; esac \
  || { echo "the tampered audit log was not reported (exit $rc)"; exit 1; }
echo "audit log verified; tampering detected"
