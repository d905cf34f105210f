#!/usr/bin/env bash
# The bloat test: steady load for SECONDS (default 300), once as a baseline
# and once with a transaction held open for the whole run (pinning the xmin
# horizon, so vacuum can clean nothing), each on a fresh database. Prints the
# throughput and dead tuples every 10 s and the ratio of the two means.
#
#   bench/bloat.sh                 # 2 x 5 minutes
#   SECONDS_PER_RUN=60 bench/bloat.sh
#
# Runs on a private PostgreSQL that bench/pg.sh starts and stops, unless
# ADMIN_URL=postgres://user:pass@host:port/postgres names a server to use.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/common.sh
bench_admin_url
run_for=${SECONDS_PER_RUN:-300}
port=${PORT:-50071}

cargo build --release --bins -q
out=$(mktemp -d)
cleanups+=("rm -rf '$out'")

phase() { # label, extra loadgen flags...
  local label=$1; shift
  SERVICE_LOG="$out/$label.log" start_service "bc_bloat_${label}_$$" "$port"
  target/release/loadgen --addr "http://127.0.0.1:$port" --seconds "$run_for" --batch 100 \
    --workers 32 --database-url "$url" --label "$label" "$@" | tee "$out/$label.txt"
  kill "$server"; wait "$server" 2>/dev/null || true
}
phase baseline
phase held --hold-xmin
base=$(sed -n 's/.*mean_invoices_per_s=\([0-9]*\).*/\1/p' "$out/baseline.txt")
held=$(sed -n 's/.*mean_invoices_per_s=\([0-9]*\).*/\1/p' "$out/held.txt")
python3 -c "print(f'bloat: baseline {$base}/s, xmin held {$held}/s, ratio {$held/$base:.2f} (goal >= 0.80)')"
