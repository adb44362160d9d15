#!/usr/bin/env bash
# Builds the targets, writes the seed corpora and fuzzes each target in turn.
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default 300 s, every target)
# One target at a time, one job (-jobs=1): the machine is shared. Logs go to
# fuzz/artifacts/logs/<target>.log, crashes to fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1   # cargo-fuzz needs -Z flags; this lets a stable toolchain take them
secs=${1:-300}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frame_decoder wire_and_upgrades intercept_body config_and_manifest certificate_identity bearer_token)

cargo fuzz build --fuzz-dir .
./target/x86_64-unknown-linux-gnu/release/seed corpus
mkdir -p artifacts/logs
for t in "${targets[@]}"; do
  echo "== $t: ${secs}s"
  rm -f fuzz-0.log
  status=0
  cargo fuzz run --fuzz-dir . "$t" -- \
    -max_len=4096 -jobs=1 -max_total_time="$secs" -timeout=10 \
    -rss_limit_mb=2048 -malloc_limit_mb=64 -print_final_stats=1 || status=$?
  mv fuzz-0.log "artifacts/logs/$t.log"
  grep -E '^#[0-9]+ +DONE|^stat::' "artifacts/logs/$t.log" || true
  [ "$status" -eq 0 ] || echo "!! $t stopped with status $status: see artifacts/logs/$t.log and artifacts/$t/"
done
