#!/usr/bin/env bash
# The benchmark suite: billing-coordinator, the raw-SQL ceiling of its own
# statements and the peer systems, on one private PostgreSQL in one run,
# each cell run several times. Prints the comparison table and writes it,
# with every raw result, to $OUT (default bench/results/<UTC time>/).
#
#   bench/run.sh            # everything, 3 runs per cell (about 30 minutes)
#   QUICK=1 bench/run.sh    # small sizes, 1 run per cell, no peers (about 5 minutes)
#
# Cells (see docs/benchmarks.md for what each measures):
#   service burn-down  N invoices (B = 100, 10; N1 for B = 1), 32 workers over gRPC
#   ceiling            the service's claim and complete statements, run by
#                      loadgen straight on C connections (4 and 32), no gRPC
#   idle pickup        32 workers long-polling, one invoice submitted at a time
#   sustained search   each round, the highest submit rate the sustained
#                      setup keeps up with, found by bisection
#   sustained          a fixed submit rate at 25/50/75% of that rate
#   scale              the B = 100 burn-down beside SCALE_COMPLETED completed
#                      invoices, each run right after one on an empty table,
#                      then a drain of SCALE_PENDING pending ones
#   peers              ../shared/bench/peers (graphile-worker, pg-boss,
#                      pgqueuer, procrastinate, and pgbench on a generic
#                      claim/complete schema), when PEERS_DIR exists. The
#                      references the targets are stated against (pgbench
#                      and graphile-worker batched) run in every round, beside
#                      the service's cells; the other peers run at the end.
#
# Settings: RUNS (3), N (100000), N1 (30000), SCALE_COMPLETED (10000000),
# SCALE_PENDING (1000000), SEARCH_STEPS (5), PEERS (1), PEERS_DIR, QUIET (seconds
# each measured run waits for an idle machine, 30), FOREIGN_MAX (the CPU other
# processes may take during a run before it is discarded, 0.35 cores) and
# MAX_EXTRA (runs again after discarded ones, 2), the rules of the peer
# scripts; BENCH_PG_DIR / BENCH_PG_PORT (the private cluster, see
# bench/pg.sh), OUT.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/common.sh
export PGOPTIONS="--client-min-messages=warning"

if [ -n "${QUICK:-}" ]; then
  : "${RUNS:=1}" "${N:=20000}" "${N1:=5000}" "${SCALE_COMPLETED:=200000}" "${SCALE_PENDING:=50000}" "${PEERS:=0}"
  : "${SEARCH_STEPS:=3}" "${SEARCH_SECONDS:=8}" "${SUSTAINED_SECONDS:=10}" "${QUIET:=10}"
fi
RUNS=${RUNS:-3} N=${N:-100000} N1=${N1:-30000}
SCALE_COMPLETED=${SCALE_COMPLETED:-10000000} SCALE_PENDING=${SCALE_PENDING:-1000000}
PEERS=${PEERS:-1} PEERS_DIR=${PEERS_DIR:-$(cd .. && pwd)/shared/bench/peers}
SUSTAINED_SECONDS=${SUSTAINED_SECONDS:-20} SEARCH_SECONDS=${SEARCH_SECONDS:-15}
SEARCH_STEPS=${SEARCH_STEPS:-5}
QUIET=${QUIET:-30} FOREIGN_MAX=${FOREIGN_MAX:-0.35} MAX_EXTRA=${MAX_EXTRA:-2}
out=${OUT:-bench/results/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
results=$out/results.jsonl
port=${PORT:-50061}

cargo build --release --bins -q
bench_admin_url
# Where the runs can be told apart from the machine: keep what PostgreSQL
# and the service said, and how the disk flushed before and after (a commit
# waits for a flush, and a stall of one holds every claim in flight).
flush_dir=${BENCH_PG_DIR:-/tmp/bc-bench-pg}
[ -z "${ADMIN_URL:-}" ] && [ -d "$flush_dir" ] || flush_dir=$out
export SERVICE_LOG=$out/service.log

{
  echo "started $(date -u +%FT%TZ) on $(nproc) cores, $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
  grep -m1 'model name' /proc/cpuinfo | sed 's/.*: /cpu: /'
  psql "$admin" -XAtc "SELECT 'postgresql: ' || version()"
  psql "$admin" -XAtc "SELECT name || '=' || setting FROM pg_settings
                       WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes', 'shared_buffers',
                                      'max_wal_size', 'autovacuum', 'wal_compression')"
  echo "RUNS=$RUNS N=$N N1=$N1 SCALE_COMPLETED=$SCALE_COMPLETED SCALE_PENDING=$SCALE_PENDING"
  echo "at the start: $(bench/diskflush.py "$flush_dir")"
} >"$out/machine.txt"
cat "$out/machine.txt"

# Every cell appends loadgen's RESULT line, with the cell's name as label.
record() { sed -n 's/^RESULT //p' | tee -a "$results" | cut -c1-220; }

# Each measured part waits for a quiet machine, and a run that other
# processes disturbed is marked discarded and run again, as the peer
# scripts do with theirs: the service's cells and theirs face the same rule.
measured=(--quiet-wait "$QUIET" --max-foreign-cores "$FOREIGN_MAX")
last_discarded() {
  tail -1 "$results" | python3 -c 'import json, sys; sys.exit(0 if json.load(sys.stdin).get("discarded") else 1)'
}
# again_if_disturbed COMMAND...: runs it, and again while its result was
# discarded, at most MAX_EXTRA more times.
again_if_disturbed() {
  for _ in $(seq 0 "$MAX_EXTRA"); do
    "$@"
    last_discarded || return 0
    echo "   other processes disturbed that run (more than $FOREIGN_MAX cores)" >&2
  done
}

stop_service() {
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  psql "$admin" -qc "DROP DATABASE IF EXISTS $1" >/dev/null
}

# service_cell NAME LOADGEN-ARGS...: a fresh database and service for one run.
service_cell() { again_if_disturbed service_run "$@"; }
service_run() {
  local name=$1; shift
  local db="bc_bench_$$"
  echo "== $name" >&2
  start_service "$db" "$port"
  target/release/loadgen --addr "http://127.0.0.1:$port" --service-pid "$server" \
    --database-url "$url" --label "$name" "${measured[@]}" "$@" | record
  stop_service "$db"
}

# ceiling_cell NAME LOADGEN-ARGS...: the statements alone, on a fresh database.
ceiling_cell() { again_if_disturbed ceiling_run "$@"; }
ceiling_run() {
  local name=$1; shift
  local db="bc_ceiling_$$"
  echo "== $name" >&2
  psql "$admin" -qc "CREATE DATABASE $db" >/dev/null
  target/release/loadgen --mode ceiling --database-url "${admin%/*}/$db" --label "$name" "${measured[@]}" "$@" | record
  psql "$admin" -qc "DROP DATABASE IF EXISTS $db" >/dev/null
}

median_rate() { # label: the median invoices/s of that cell so far
  python3 - "$results" "$1" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
rates = [r["invoices_per_s"] for r in runs if r["label"] == sys.argv[2] and not r.get("discarded")]
print(int(statistics.median(rates)))
PY
}

peers=0
if [ "$PEERS" = 1 ] && [ -d "$PEERS_DIR" ]; then
  peers=1
  pg_port=${admin##*:}; pg_port=${pg_port%%/*}
  # The peer scripts tell the cluster's CPU from everything else's (and
  # discard runs the rest of the machine disturbed) by its data directory.
  export PGPORT=$pg_port QUIET FOREIGN_MAX RESULTS=$out/peers.jsonl
  export PGDATA_DIR=${BENCH_PG_DIR:-/tmp/bc-bench-pg}/data
  if [ ! -d "$PEERS_DIR/graphile-worker/node_modules" ]; then
    echo "== installing the peers ($PEERS_DIR/setup.sh)" >&2
    "$PEERS_DIR/setup.sh" >"$out/peers-setup.log" 2>&1
  fi
  psql "$admin" -qc "CREATE DATABASE bench" >/dev/null
elif [ "$PEERS" = 1 ]; then
  echo "no peer scripts at $PEERS_DIR: the table has no peer rows" >&2
fi

# peer NAME COMMAND...: runs a peer script (RUNS times), which appends its
# figures to the run's results files.
peer() {
  echo "== peers: $1" >&2
  shift
  "$@" >/dev/null
}

# The cells the targets divide by: the generic pgbench drains and
# graphile-worker batched, once per round, so that a slow spell of the
# machine lands on both sides of each ratio.
reference_cells() {
  [ "$peers" = 1 ] || return 0
  RUNS=1 OUT=$out/raw-sql CLIENTS=32 SCENARIOS=A100k peer "pgbench one row per transaction" "$PEERS_DIR/raw-sql/run.sh"
  RUNS=1 OUT=$out/raw-sql CLIENTS=4 SCENARIOS=B100k peer "pgbench drain" "$PEERS_DIR/raw-sql/run.sh"
  RUNS=1 peer "graphile-worker batched" "$PEERS_DIR/run-peer.sh" graphile-worker batched
}

# The highest submit rate the sustained cells keep up with (loadgen's
# kept_up: at least 99% of it completed, pickup p50 under 100 ms), by
# bisection between a quarter of the B = 10 burn-down and the burn-down
# itself. The burn-down only bounds it: it submits nothing while it drains,
# while here a producer's submits share the same cores with the drain.
# Offering more than the service can take would not measure it either: the
# surplus submits take CPU from the drain. Appends the round's figure to
# the results as a "sustained max" line.
sustained_search() {
  local hi lo mid
  hi=$(median_rate "service B=10")
  lo=$((hi / 4))
  for _ in $(seq "$SEARCH_STEPS"); do
    mid=$(((lo + hi) / 2))
    service_cell "sustained search" --mode sustained --batch 10 --rate "$mid" --seconds "$SEARCH_SECONDS"
    if [ "$(tail -1 "$results" | python3 -c 'import json, sys; print(json.load(sys.stdin)["kept_up"])')" = True ]; then
      lo=$mid
    else
      hi=$mid
    fi
  done
  echo "{\"label\": \"sustained max\", \"mode\": \"sustained-max\", \"invoices_per_s\": $lo}" >>"$results"
  echo "sustained max: $lo/s" >&2
}

# Rounds interleave the cells, so that a slow spell of the machine spreads
# over all of them instead of sinking one.
for run in $(seq "$RUNS"); do
  echo "=== round $run of $RUNS" >&2
  service_cell "service B=100" --mode burn-down --batch 100 --invoices "$N"
  service_cell "service B=10" --mode burn-down --batch 10 --invoices "$N"
  service_cell "service B=1" --mode burn-down --batch 1 --invoices "$N1"
  ceiling_cell "ceiling B=100 C=4" --batch 100 --connections 4 --invoices "$N"
  ceiling_cell "ceiling B=100 C=32" --batch 100 --connections 32 --invoices "$N"
  ceiling_cell "ceiling B=10 C=4" --batch 10 --connections 4 --invoices "$N"
  ceiling_cell "ceiling B=10 C=32" --batch 10 --connections 32 --invoices "$N"
  ceiling_cell "ceiling B=1 C=8" --batch 1 --connections 8 --invoices "$N1"
  ceiling_cell "ceiling B=1 C=32" --batch 1 --connections 32 --invoices "$N1"
  service_cell "idle pickup" --mode idle-pickup --workers 32 --tries 200
  sustained_search
  reference_cells
done

# Fixed arrival rates, as shares of the highest rate kept up with.
max=$(median_rate "sustained max")
for run in $(seq "$RUNS"); do
  for share in 25 50 75; do
    service_cell "sustained ${share}%" --mode sustained --batch 10 \
      --rate $((max * share / 100)) --seconds "$SUSTAINED_SECONDS"
  done
done

# Scale: finished invoices pile up in a long-lived table; the claim path
# must not notice them. They are written straight into the table (through
# the service this would take an hour), then the burn-down runs beside them.
echo "== scale: writing $SCALE_COMPLETED completed invoices" >&2
db="bc_scale_$$"
start_service "$db" "$port"
psql "$url" -Xq -v ON_ERROR_STOP=1 -v n="$SCALE_COMPLETED" -f bench/sql/completed_invoices.sql
psql "$url" -XAtc "SELECT 'scale table: ' || count(*) || ' invoices, ' ||
                   pg_size_pretty(pg_total_relation_size('invoices')) FROM invoices" | tee -a "$out/machine.txt"
scale_server=$server scale_url=$url
# The empty-table figure each drain beside them is compared with, from a
# fresh database and service of its own, run next to it: before it in odd
# rounds and after it in even ones, so that neither side always inherits
# the other's checkpoint.
scale_reference() {
  port=$((port + 1)) service_cell "scale reference: B=100, empty table" --mode burn-down --batch 100 --invoices "$N"
  server=$scale_server url=$scale_url
}
# scale_drain NAME INVOICES: a drain on the service beside the completed rows.
scale_drain() {
  echo "== $1" >&2
  target/release/loadgen --addr "http://127.0.0.1:$port" --service-pid "$server" --database-url "$url" \
    --label "$1" --mode burn-down --batch 100 --invoices "$2" "${measured[@]}" | record
}
for run in $(seq "$RUNS"); do
  if ((run % 2)); then scale_reference; fi
  again_if_disturbed scale_drain "scale B=100 beside completed" "$N"
  if ! ((run % 2)); then scale_reference; fi
done
again_if_disturbed scale_drain "scale B=100 from pending" "$SCALE_PENDING"
stop_service "$db"

if [ "$peers" = 1 ]; then
  for config in "graphile-worker default" "pg-boss lc1-b32" "pgqueuer b16"; do
    # shellcheck disable=SC2086
    RUNS=$RUNS peer "$config" "$PEERS_DIR/run-peer.sh" $config
  done
  RUNS=$RUNS N=20000 peer "procrastinate delete" "$PEERS_DIR/run-peer.sh" procrastinate delete
fi

echo "at the end: $(bench/diskflush.py "$flush_dir")" >>"$out/machine.txt"
python3 bench/summarize.py "$out" | tee "$out/summary.md"
