#!/usr/bin/env bash
# Soak: the sidecar under mixed traffic for a bounded time while faults are injected, on
# loopback only. Reports what the clients saw by kind, the sidecar's RSS over time, what the
# sidecar counted, and ends with `aesp audit verify` of the trail it wrote.
#
#   bench/soak.sh [path/to/aesp]        (default target/release/aesp; build it first)
#
#   SOAK_SECONDS   how long the traffic runs (default 180)
#   SOAK_MAX_CALLS stop the traffic after this many calls (default 300000)
#   SOAK_CLIENTS   client threads, each on a channel of its own (default 4)
#   KEEP_WORKDIR=1 keep the work directory (logs, config, state, driver.json, rss.csv)
#
# Processes, all on 127.0.0.1 with ports of their own: `aesp grid-host`, `aesp serve`, two
# `aesp grid-runtime`s connected through the sidecar, and bench/soak_driver.py (Python grpcio)
# calling through the sidecar: sessions, ExecuteTool, ExecuteToolStream, and calls refused by
# RBAC, by a CEL policy and for a missing token.
#
# Faults, on a 60 s cycle: the host stopped (SIGTERM) and restarted at 10 s, killed (SIGKILL)
# and restarted 2 s later at 40 s; a runtime stalled (SIGSTOP) from 20 s to 28 s (one, then
# the other, cycle by cycle); the RBAC file
# changed every 15 s and the policies every 20 s (hot reload, rbac.reload_seconds and
# policies.reload_seconds = 1), each once broken then fixed in the first cycle; the sidecar's
# certificate renewed (same key, new serial: tls.reload_seconds = 2) at 25 s and 55 s, and
# the serial served to a new connection checked with openssl s_client.
# Not injected: audit or control store write failures (they have test hooks only:
# tests/audit.rs, tests/hardening.rs).
#
# Exit status: 1 if the audit trail does not verify, or a client saw a kind of failure that
# no injected fault explains; RSS is reported, not judged.
set -euo pipefail
cd "$(dirname "$0")/.."
AESP=$(realpath "${1:-target/release/aesp}")
DURATION=${SOAK_SECONDS:-180}
MAX_CALLS=${SOAK_MAX_CALLS:-300000}
CLIENTS=${SOAK_CLIENTS:-4}
[ -x "$AESP" ] || { echo "no aesp binary at $AESP: cargo build --release first, or pass its path" >&2; exit 2; }
command -v openssl >/dev/null || { echo "openssl is needed (certificate renewal)" >&2; exit 2; }
python3 -c 'import grpc, grpc_tools' 2>/dev/null || python3 -m pip install -q 'grpcio==1.*' 'grpcio-tools==1.*'

work=$(mktemp -d)
c=$work/certs
host_pid="" sidecar_pid="" rt1_pid="" rt2_pid="" driver_pid=""
cleanup() {
  for p in $driver_pid $rt1_pid $rt2_pid $sidecar_pid $host_pid; do
    kill -CONT "$p" 2>/dev/null || true
    kill "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [ "${KEEP_WORKDIR:-}" = 1 ]; then echo "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
t=0
log() { printf '[t=%3ds] %s\n' "$t" "$*"; }

# ---------------------------------------------------------------- setup
# The demo's certificates, tokens and RBAC file (its own ports are throwaway).
"$AESP" demo --once --dir "$c" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  --management-listen 127.0.0.1:0 --host-listen 127.0.0.1:0 >"$work/demo.log" 2>&1 \
  || { cat "$work/demo.log"; echo "aesp demo --once failed" >&2; exit 1; }
mkdir -p "$work/stubs"
python3 -m grpc_tools.protoc -Iproto --python_out="$work/stubs" --grpc_python_out="$work/stubs" \
  altar/adm/v1/adm.proto altar/grid/v1/grid.proto altar/aesp/v1/aesp.proto google/rpc/status.proto
for d in altar altar/adm altar/adm/v1 altar/grid altar/grid/v1 altar/aesp altar/aesp/v1; do touch "$work/stubs/$d/__init__.py"; done

PORT=$(free_port) ADMIN=$(free_port) HOST=$(free_port)
cp "$c/rbac.yaml" "$c/soak-rbac.base.yaml"
cp "$c/rbac.yaml" "$c/soak-rbac.yaml"
mkdir -p "$c/soak-policies"
cp policies/cel/*.yaml "$c/soak-policies/"
cat >"$c/soak.yaml" <<EOF
listen: 127.0.0.1:$PORT
admin_listen: 127.0.0.1:$ADMIN
management_listen: off
tls:
  cert: server.crt
  key: server.key
  client_ca: ca.crt
  reload_seconds: 2
upstream:
  address: http://127.0.0.1:$HOST
  connect_timeout_ms: 1000
identity:
  trust_domain: aesp.local
  organization_id: soak-org
auth:
  tokens_required: [client]
  issuers:
    - issuer: https://aesp-demo.local
      audiences: [aesp]
      jwks_file: issuer.jwks.json
state_dir: soak-state
rbac:
  file: soak-rbac.yaml
  reload_seconds: 1
policies:
  path: soak-policies
  reload_seconds: 1
audit:
  mode: sync
limits:
  upstream_response_timeout_ms: 5000
shutdown_grace_seconds: 5
EOF
"$AESP" serve --config "$c/soak.yaml" --check-config >"$work/check.log" 2>&1 \
  || { cat "$work/check.log"; echo "the soak configuration does not load" >&2; exit 1; }

start_host() {
  "$AESP" grid-host --listen "127.0.0.1:$HOST" >>"$work/host.log" 2>&1 &
  host_pid=$!
}
start_runtime() { # $1: runtime id
  "$AESP" grid-runtime --endpoint "https://127.0.0.1:$PORT" --ca "$c/ca.crt" \
    --cert "$c/runtime.crt" --key "$c/runtime.key" --runtime-id "$1" >>"$work/$1.log" 2>&1 &
}
metric() { # the sum of a metric's series whose line matches $1
  curl -s "http://127.0.0.1:$ADMIN/metrics" | awk -v m="$1" '$0 ~ "^"m { s += $NF } END { printf "%d", s }'
}
served_serial() {
  openssl s_client -connect "127.0.0.1:$PORT" -servername localhost -CAfile "$c/ca.crt" \
    -cert "$c/acme.crt" -key "$c/acme.key" </dev/null 2>/dev/null | openssl x509 -noout -serial 2>/dev/null \
    | cut -d= -f2
}
renew_cert() { # a new certificate for the same key: a new serial, nothing else changes
  openssl req -new -key "$c/server.key" -subj /CN=localhost -out "$work/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n' >"$work/ext.cnf"
  openssl x509 -req -in "$work/server.csr" -CA "$c/ca.crt" -CAkey "$c/ca.key" \
    -set_serial "0x$(openssl rand -hex 12)" -days 2 -extfile "$work/ext.cnf" -out "$work/server.crt.new" 2>/dev/null
  mv "$work/server.crt.new" "$c/server.crt"
  openssl x509 -in "$c/server.crt" -noout -serial | cut -d= -f2
}
rbac_version() { # $1: 0 or 1; 1 adds a role nobody holds
  cp "$c/soak-rbac.base.yaml" "$work/rbac.new"
  if [ "$1" = 1 ]; then
    python3 - "$work/rbac.new" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read().replace("roles:\n", "roles:\n  - name: soak-extra\n    permissions: [grid.session.create]\n", 1)
open(p, "w").write(s)
PY
  fi
  mv "$work/rbac.new" "$c/soak-rbac.yaml"
}
policy_version() { # $1: a number; a policy that never matches, its text changing
  printf 'policies:\n  - id: soak-toggle\n    effect: DENY\n    tools: [add]\n    condition: has(args.a) && args.a == %d\n' \
    "$((424242 + $1))" >"$work/policy.new"
  mv "$work/policy.new" "$c/soak-policies/soak.yaml"
}

start_host
"$AESP" serve --config "$c/soak.yaml" >>"$work/sidecar.log" 2>&1 &
sidecar_pid=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null || { tail "$work/sidecar.log"; echo "the sidecar did not become ready" >&2; exit 1; }
start_runtime soak-rt-1; rt1_pid=$!
start_runtime soak-rt-2; rt2_pid=$!
sleep 2
log "sidecar pid $sidecar_pid on :$PORT, host :$HOST, runtimes $rt1_pid $rt2_pid; traffic for ${DURATION}s, at most $MAX_CALLS calls, $CLIENTS clients"

PYTHONPATH="$work/stubs" python3 bench/soak_driver.py --certs "$c" --port "$PORT" \
  --seconds "$DURATION" --max-calls "$MAX_CALLS" --clients "$CLIENTS" --out "$work/driver.json" \
  2>"$work/driver.log" &
driver_pid=$!

# ---------------------------------------------------------------- faults while it runs
echo "t_s,rss_kib,fds,connections_active,buffered_bytes,audit_records" >"$work/rss.csv"
declare -A faults
renewed=() served=() stalled=""
while kill -0 "$driver_pid" 2>/dev/null; do
  sleep 1
  t=$((t + 1))
  cyc=$((t % 60))
  if [ $((t % 5)) = 0 ]; then
    rss=$(awk '/VmRSS/ { print $2 }' "/proc/$sidecar_pid/status")
    fds=$(ls "/proc/$sidecar_pid/fd" | wc -l)
    echo "$t,$rss,$fds,$(metric aesp_connections_active),$(metric aesp_buffered_bytes),$(metric aesp_audit_records_total)" >>"$work/rss.csv"
  fi
  case $cyc in
    10) log "host: SIGTERM, restart"; kill "$host_pid"; wait "$host_pid" 2>/dev/null || true; start_host
        faults[host_restart]=$((${faults[host_restart]:-0} + 1)) ;;
    40) log "host: SIGKILL, restart in 2 s"; kill -9 "$host_pid"; wait "$host_pid" 2>/dev/null || true
        faults[host_kill_9]=$((${faults[host_kill_9]:-0} + 1)) ;;
    42) start_host ;;
    # The host sends a session's calls to the runtime that fulfilled it first: stall one,
    # then the other, in turns.
    20) stalled=$([ $(((t / 60) % 2)) = 0 ] && echo "$rt1_pid" || echo "$rt2_pid")
        log "runtime $stalled: SIGSTOP"; kill -STOP "$stalled"
        faults[runtime_stall]=$((${faults[runtime_stall]:-0} + 1)) ;;
    28) log "runtime $stalled: SIGCONT"; kill -CONT "$stalled" ;;
    25|55) s=$(renew_cert); renewed+=("$s"); log "certificate renewed: serial $s"
        faults[cert_renewal]=$((${faults[cert_renewal]:-0} + 1)) ;;
    29|59) s=$(served_serial || true); served+=("$s") ;;
  esac
  if [ $((t % 15)) = 5 ]; then
    rbac_version $(((t / 15) % 2)); faults[rbac_change]=$((${faults[rbac_change]:-0} + 1))
  fi
  if [ $((t % 20)) = 12 ]; then
    policy_version "$t"; faults[policy_change]=$((${faults[policy_change]:-0} + 1))
  fi
  case $t in
    47) log "rbac file broken"; printf 'roles: [\n' >"$c/soak-rbac.yaml"; faults[broken_rbac]=1 ;;
    49) rbac_version 0 ;;
    52) log "policy file broken"; printf 'policies:\n  - id: soak-broken\n    effect: DENY\n    condition: args.(\n' >"$c/soak-policies/soak.yaml"; faults[broken_policy]=1 ;;
    54) policy_version 0 ;;
  esac
done
wait "$driver_pid" || { cat "$work/driver.log"; echo "the driver failed" >&2; exit 1; }
driver_pid=""
kill -CONT "$rt1_pid" "$rt2_pid" 2>/dev/null || true
sleep 1

# ---------------------------------------------------------------- report
ended_conn=$(metric aesp_connections_active) ended_buf=$(metric aesp_buffered_bytes)
denials=$(curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '/^aesp_denials_total/ && $NF > 0 { sub(/aesp_denials_total/, ""); printf "%s ", $0 }')
upstream_errors=$(metric aesp_upstream_errors_total)
reload_failures=$(metric aesp_config_reload_failures_total)
kill "$sidecar_pid"; wait "$sidecar_pid" 2>/dev/null || true; sidecar_pid=""
verify=$("$AESP" audit verify --db "$c/soak-state/audit.redb" 2>&1) && verified=1 || verified=0

faults_text=""
for k in "${!faults[@]}"; do faults_text+="$k=${faults[$k]} "; done
echo
echo "== soak summary"
echo "faults injected: $faults_text"
echo "certificate serials renewed: ${renewed[*]:-none}; served afterwards: ${served[*]:-none}"
python3 - "$work/driver.json" "$work/rss.csv" <<'PY'
import csv, json, statistics, sys
d = json.load(open(sys.argv[1]))
print(f"traffic: {d['calls']} calls in {d['seconds']} s ({d['calls_per_second']}/s)")
print("outcomes by call (expected kind first):")
for call, kinds in d["by_call"].items():
    want = d["expected"][call]
    rest = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items(), key=lambda x: -x[1]) if k != want)
    print(f"  {call:15} {want} {kinds.get(want, 0)}" + (f"; other: {rest}" if rest else ""))
print("unexpected kinds by time (s from start):")
for b, kinds in d["unexpected_timeline"].items():
    print(f"  {int(b):4}-{int(b) + 10:<4} " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
print("slowest call by kind (s):", d["latency_max_s"])
rows = list(csv.DictReader(open(sys.argv[2])))
rss = [int(r["rss_kib"]) for r in rows]
if len(rss) >= 6:
    third = len(rss) // 3
    first, last = statistics.median(rss[third:2 * third]), statistics.median(rss[2 * third:])
    print(f"sidecar RSS (KiB), every 5 s: start {rss[0]}, max {max(rss)}, end {rss[-1]}; "
          f"median of the middle third {first:.0f}, of the last third {last:.0f} ({(last - first) / 1024:+.1f} MiB)")
    print("  " + " ".join(str(r // 1024) for r in rss) + "  (MiB)")
    print(f"sidecar fds: start {rows[0]['fds']}, max {max(int(r['fds']) for r in rows)}, end {rows[-1]['fds']}")
PY
echo "sidecar at the end: connections_active $ended_conn (the two runtimes), buffered_bytes $ended_buf"
echo "sidecar counted: denials ${denials:-none}; upstream errors $upstream_errors; config reload failures $reload_failures"
echo "audit verify: $verify"

# Failures a client may see while the faults run; anything else is unexplained.
unexplained=$(python3 - "$work/driver.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
explained = {
    "ee:UPSTREAM_UNAVAILABLE",  # host down, or a call stuck on the stalled runtime (5 s)
    "tool:NO_RUNTIME",          # host back, runtimes not reconnected yet
    "tool:RUNTIME_DISCONNECTED", "tool:RUNTIME_TIMEOUT",
    "tool:SESSION_INVALID",     # a session of the host before its restart
    "grpc:DEADLINE_EXCEEDED",   # a stream whose chunks were on the stalled runtime
}
bad = {f"{c} {k}": n for c, kinds in d["by_call"].items() for k, n in kinds.items()
       if k != d["expected"][c] and k not in explained}
print(" ".join(f"{k}={n}" for k, n in bad.items()))
PY
)
status=0
[ "$verified" = 1 ] || { echo "FAIL: the audit trail does not verify"; status=1; }
[ -z "$unexplained" ] || { echo "FAIL: failures no fault explains: $unexplained"; status=1; }
[ "$status" = 0 ] && echo "soak OK"
exit $status
