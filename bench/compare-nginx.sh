#!/usr/bin/env bash
# The aesp sidecar against nginx doing only mTLS termination and grpc_pass, under the same
# load, both pinned to the same cores. Prints the benchmark's table with the ratio aesp/nginx.
#
#   bench/compare-nginx.sh              # 5 s per case and path
#   AESP_BENCH_SECS=2 bench/compare-nginx.sh
#
# Two stacks run side by side, each with its own reference GRID host (`aesp grid-host`) and
# its own reference runtime, so that the runtime's Connect stream crosses the same proxy as
# the client's calls:
#
#   load ──mTLS 1.3──▶ nginx (ssl_verify_client on, grpc_pass) ──h2c──▶ grid-host A ◀── runtime
#   load ──mTLS 1.3──▶ aesp serve                               ──h2c──▶ grid-host B ◀── runtime
#
# The load is the benchmark binary (benches/proxy.rs) in its external-target mode; it
# alternates between the two proxies in slices and charges each proxy's CPU time to it
# (AESP_BENCH_PIDS). Environment: PROXY_CPUS (default 1) are the cores both proxies are
# pinned to; LOAD_CPUS (default 0) those of the hosts, runtimes and load; KEEP_WORKDIR=1 keeps
# the temporary directory (configs, logs, result.md); every AESP_BENCH_* variable of the
# benchmark applies. If nginx cannot be installed the script says so and exits 0.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
NCPU=$(nproc 2>/dev/null || echo 1)
if [ "$NCPU" -ge 2 ]; then
    PROXY_CPUS=${PROXY_CPUS:-1}
    LOAD_CPUS=${LOAD_CPUS:-0}
else
    PROXY_CPUS=${PROXY_CPUS:-0}
    LOAD_CPUS=${LOAD_CPUS:-0}
fi
KEEP_WORKDIR=${KEEP_WORKDIR:-0}

log() { printf '%s\n' "$*" >&2; }

# ------------------------------------------------------------------------------- nginx

find_nginx() {
    command -v nginx 2>/dev/null || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true
}

NGINX=$(find_nginx)
if [ -z "$NGINX" ]; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            SUDO="sudo -n"
        else
            log "nginx is not installed and this user cannot install it (not root, no sudo)."
            log "Install it (apt-get install nginx-light, or nginx) and run this script again."
            exit 0
        fi
    fi
    log "installing nginx from Debian ..."
    export DEBIAN_FRONTEND=noninteractive
    if ! { $SUDO apt-get install -y -q nginx-light >/dev/null 2>&1 ||
        { $SUDO apt-get update -q >/dev/null 2>&1 &&
            { $SUDO apt-get install -y -q nginx-light >/dev/null 2>&1 ||
                $SUDO apt-get install -y -q nginx >/dev/null 2>&1; }; }; }; then
        log "nginx could not be installed with apt-get (no Debian repository or no network?)."
        log "Skipping the nginx comparison."
        exit 0
    fi
    NGINX=$(find_nginx)
    if [ -z "$NGINX" ]; then
        log "apt-get reported success but no nginx binary was found; skipping the comparison."
        exit 0
    fi
fi
NGINX_VERSION=$("$NGINX" -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
if "$NGINX" -V 2>&1 | grep -q -- '--without-http_grpc_module'; then
    log "this nginx ($NGINX_VERSION) is built without the grpc module; skipping the comparison."
    exit 0
fi
log "nginx $NGINX_VERSION: $NGINX"

# ------------------------------------------------------------------------------- build

cd "$ROOT"
executable() { grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | grep -- "$1" | tail -n 1; }
log "building aesp and the benchmark (release) ..."
AESP=$(cargo build --release --bin aesp --message-format=json 2>/dev/null | executable '/aesp$')
BENCH=$(cargo bench --bench proxy --no-run --message-format=json 2>/dev/null | executable '/proxy-')
if [ -z "$AESP" ] || [ -z "$BENCH" ]; then
    log "build failed; run: cargo build --release --bin aesp && cargo bench --bench proxy --no-run"
    exit 1
fi

# ------------------------------------------------------------------------------- setup

WORK=$(mktemp -d "${TMPDIR:-/tmp}/aesp-vs-nginx.XXXXXX")
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "$KEEP_WORKDIR" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() {
    if command -v ss >/dev/null 2>&1; then
        [ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    fi
}
USED_PORTS=" "
# pick_port VAR FIRST: the first free port from FIRST on, not already picked.
pick_port() {
    local p=$2
    while [[ $USED_PORTS == *" $p "* ]] || port_busy "$p"; do p=$((p + 1)); done
    USED_PORTS+="$p "
    printf -v "$1" '%s' "$p"
}
wait_port() {
    local i
    for i in $(seq 1 100); do
        port_busy "$1" && return 0
        sleep 0.1
    done
    log "nothing listens on 127.0.0.1:$1 after 10 s ($2); logs in $WORK"
    KEEP_WORKDIR=1
    exit 1
}

pick_port HOST_NGINX 50051
pick_port HOST_AESP 50052
pick_port NGINX_PORT 8444
pick_port AESP_PORT 8443
pick_port ADMIN_PORT 9901
pick_port MGMT_PORT 9443

# Dev certificates (CA, server, acme client, runtime) and the demo's sidecar.yaml, from the
# library; `aesp demo --once --dir DIR` writes the same files but needs ports 50051, 8443,
# 9901 and 9443 free for its own run.
CERTS="$WORK/certs"
AESP_BENCH_CERTS_ONLY="$CERTS" "$BENCH" >/dev/null
sed -e "s|127.0.0.1:8443|127.0.0.1:$AESP_PORT|" \
    -e "s|127.0.0.1:9901|127.0.0.1:$ADMIN_PORT|" \
    -e "s|127.0.0.1:9443|127.0.0.1:$MGMT_PORT|" \
    -e "s|http://127.0.0.1:50051|http://127.0.0.1:$HOST_AESP|" \
    "$CERTS/sidecar.yaml" >"$WORK/sidecar.yaml.tmp"
mv "$WORK/sidecar.yaml.tmp" "$CERTS/sidecar.yaml"
"$AESP" serve --config "$CERTS/sidecar.yaml" --check-config >/dev/null

# nginx: TLS 1.3 only, a client certificate from the dev CA required, gRPC to host A.
if printf '%s\n%s\n' "1.25.1" "$NGINX_VERSION" | sort -V -C; then
    LISTEN="listen 127.0.0.1:$NGINX_PORT ssl;
        http2 on;"
else
    LISTEN="listen 127.0.0.1:$NGINX_PORT ssl http2;"
fi
USER_LINE=""
[ "$(id -u)" = 0 ] && USER_LINE="user root;"
mkdir -p "$WORK/nginx-tmp"
cat >"$WORK/nginx.conf" <<EOF
$USER_LINE
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx-tmp/body;
    proxy_temp_path $WORK/nginx-tmp/proxy;
    fastcgi_temp_path $WORK/nginx-tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx-tmp/uwsgi;
    scgi_temp_path $WORK/nginx-tmp/scgi;
    upstream grid_host {
        server 127.0.0.1:$HOST_NGINX;
        keepalive 128;
    }
    server {
        $LISTEN
        ssl_certificate $CERTS/server.crt;
        ssl_certificate_key $CERTS/server.key;
        ssl_protocols TLSv1.3;
        ssl_client_certificate $CERTS/ca.crt;
        ssl_verify_client on;
        ssl_verify_depth 2;
        # Long-lived HTTP/2 connections and the runtime's idle Connect stream.
        keepalive_requests 1000000000;
        keepalive_timeout 3600s;
        http2_max_concurrent_streams 1024;
        client_body_timeout 3600s;
        client_max_body_size 0;  # the Connect stream is one endless request body
        grpc_read_timeout 3600s;
        grpc_send_timeout 3600s;
        location / {
            # The one piece of identity nginx can pass on without understanding gRPC.
            grpc_set_header x-client-dn \$ssl_client_s_dn;
            grpc_pass grpc://grid_host;
        }
    }
}
EOF
if ! "$NGINX" -t -q -p "$WORK" -c "$WORK/nginx.conf" 2>"$WORK/nginx-t.log"; then
    log "nginx rejects the configuration:"
    cat "$WORK/nginx-t.log" >&2
    KEEP_WORKDIR=1
    exit 1
fi

# ------------------------------------------------------------------------------- start

log "hosts on :$HOST_NGINX (behind nginx) and :$HOST_AESP (behind aesp), cores $LOAD_CPUS"
taskset -c "$LOAD_CPUS" "$AESP" --log warn grid-host --listen "127.0.0.1:$HOST_NGINX" \
    >"$WORK/host-nginx.log" 2>&1 &
PIDS+=($!)
taskset -c "$LOAD_CPUS" "$AESP" --log warn grid-host --listen "127.0.0.1:$HOST_AESP" \
    >"$WORK/host-aesp.log" 2>&1 &
PIDS+=($!)
wait_port "$HOST_NGINX" "grid-host A"
wait_port "$HOST_AESP" "grid-host B"

log "nginx on :$NGINX_PORT and aesp on :$AESP_PORT, both pinned to cores $PROXY_CPUS"
taskset -c "$PROXY_CPUS" "$NGINX" -p "$WORK" -c "$WORK/nginx.conf" -g 'daemon off;' \
    >"$WORK/nginx.log" 2>&1 &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
taskset -c "$PROXY_CPUS" "$AESP" --log warn serve --config "$CERTS/sidecar.yaml" \
    >"$WORK/aesp.log" 2>&1 &
AESP_PID=$!
PIDS+=("$AESP_PID")
wait_port "$NGINX_PORT" "nginx"
wait_port "$AESP_PORT" "aesp serve"
NGINX_WORKERS=""
for _ in $(seq 1 50); do
    NGINX_WORKERS=$(pgrep -P "$NGINX_PID" | paste -sd+ -)
    [ -n "$NGINX_WORKERS" ] && break
    sleep 0.1
done

for pair in "nginx:$NGINX_PORT" "aesp:$AESP_PORT"; do
    taskset -c "$LOAD_CPUS" "$AESP" --log warn grid-runtime \
        --endpoint "https://127.0.0.1:${pair#*:}" \
        --ca "$CERTS/ca.crt" --cert "$CERTS/runtime.crt" --key "$CERTS/runtime.key" \
        --runtime-id "bench-runtime-${pair%%:*}" >"$WORK/runtime-${pair%%:*}.log" 2>&1 &
    PIDS+=($!)
done

# ------------------------------------------------------------------------------- load

log "load on cores $LOAD_CPUS (the benchmark waits for each runtime to be connected)"
set +e
AESP_BENCH_BASELINE="nginx=127.0.0.1:$NGINX_PORT" \
    AESP_BENCH_TARGET="aesp=127.0.0.1:$AESP_PORT" \
    AESP_BENCH_CERT_DIR="$CERTS" \
    AESP_BENCH_PIDS="nginx=$NGINX_PID${NGINX_WORKERS:++$NGINX_WORKERS},aesp=$AESP_PID" \
    taskset -c "$LOAD_CPUS" "$BENCH" --bench | tee "$WORK/result.md"
STATUS=${PIPESTATUS[0]}
set -e
echo
echo "nginx $NGINX_VERSION (worker_processes 1) and aesp serve pinned to cores $PROXY_CPUS;" \
    "hosts, runtimes and load on cores $LOAD_CPUS; $NCPU CPUs on this machine."
echo "CPU µs/call = user+system time of the proxy's own processes per call (CLK_TCK 100)."
exit "$STATUS"
