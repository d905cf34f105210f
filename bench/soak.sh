#!/usr/bin/env bash
# The soak test: the service under a fixed submission rate (half of its
# measured steady maximum by default) for SOAK_SECONDS (default 1800),
# printing every 10 s the throughput, the claim p99 and the service's RSS.
# Not run in CI.
#
#   RATE=5000 bench/soak.sh
#   SOAK_SECONDS=600 bench/soak.sh
#
# Runs on a private PostgreSQL that bench/pg.sh starts and stops, unless
# ADMIN_URL=postgres://user:pass@host:port/postgres names a server to use.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/common.sh
bench_admin_url
soak_for=${SOAK_SECONDS:-1800}
port=${PORT:-50072}

cargo build --release --bins -q
start_service "bc_soak_$$" "$port"

if [ -z "${RATE:-}" ]; then
  max=$(target/release/loadgen --addr "http://127.0.0.1:$port" --seconds 30 --batch 100 --workers 32 \
          --label max | sed -n 's/.*mean_invoices_per_s=\([0-9]*\).*/\1/p')
  RATE=$((max / 2))
  echo "soak: steady maximum ${max}/s, soaking at ${RATE}/s"
fi
target/release/loadgen --addr "http://127.0.0.1:$port" --seconds "$soak_for" --rate "$RATE" \
  --batch 100 --workers 32 --database-url "$url" --service-pid "$server" --label soak
