#!/usr/bin/env bash
# Schema variants of the claim path, measured as statements before any of
# them is built into the service: pgbench drains ROWS invoices with CLIENTS
# connections, each claiming 100 and completing them, on databases migrated
# by the service itself. Variants run interleaved, ROUNDS times, each round
# in a rotated order, and the table gives each one's median against the
# first variant's.
#
#   bench/schema_ab.sh                         # current narrow no_audit brin
#   ROUNDS=3 bench/schema_ab.sh current ff35 ff70
#
# A variant is bench/sql/schema_ab/VARIANT.{setup,fill,claim,complete}.sql:
# setup runs once after the migrations; fill, claim and complete, when
# missing, are the current schema's. pgbench runs the claim and then the
# completion, as one script. Uses ADMIN_URL, or a private cluster (bench/pg.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/common.sh
rows=${ROWS:-100000}
rounds=${ROUNDS:-6}
clients=${CLIENTS:-4}
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(current narrow no_audit brin)
sql=bench/sql/schema_ab
bin=$(pg_config --bindir 2>/dev/null || true)
[ -x "$bin/pgbench" ] || bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

cargo build --release --bin billing-coordinator -q
bench_admin_url
for v in "${variants[@]}"; do
  compgen -G "$sql/$v.*.sql" >/dev/null ||
    { echo "no variant $v in $sql" >&2; exit 2; }
  db="bc_ab_${v}_$$"
  psql "$admin" -qc "CREATE DATABASE $db" >/dev/null
  cleanups+=("psql '$admin' -qc 'DROP DATABASE IF EXISTS $db' >/dev/null")
  DATABASE_URL=${admin%/*}/$db RUST_LOG=warn target/release/billing-coordinator migrate
  if [ -f "$sql/$v.setup.sql" ]; then psql "${admin%/*}/$db" -q -v ON_ERROR_STOP=1 -f "$sql/$v.setup.sql"; fi
done

pick() { if [ -f "$sql/$1.$2.sql" ]; then echo "$sql/$1.$2.sql"; else echo "$sql/current.$2.sql"; fi; }
results=$(mktemp)
scripts=$(mktemp -d)
cleanups+=("rm -rf $results $scripts")
for v in "${variants[@]}"; do cat "$(pick "$v" claim)" "$(pick "$v" complete)" >"$scripts/$v.sql"; done
n=${#variants[@]}
for round in $(seq "$rounds"); do
  # Each round starts one variant further on, so that none always runs first.
  for i in $(seq 0 $((n - 1))); do
    v=${variants[$(((i + round - 1) % n))]}
    url=${admin%/*}/bc_ab_${v}_$$
    psql "$url" -q -v ON_ERROR_STOP=1 -v rows="$rows" -f "$(pick "$v" fill)" >/dev/null
    from=$(psql "$url" -Atc "SELECT pg_current_wal_lsn()")
    # The settings of the service's claim and completion connections
    # (GENERIC_PLANS and jit in src/store/mod.rs).
    ran=$(PGOPTIONS="-c plan_cache_mode=force_generic_plan -c enable_seqscan=off -c jit=off" \
      "$bin/pgbench" -n -M prepared -c "$clients" -j 2 -t $((rows / 100 / clients)) \
      -f "$scripts/$v.sql" "$url" 2>&1) || { echo "$ran" >&2; echo "pgbench failed on variant $v" >&2; exit 1; }
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$ran")
    wal=$(psql "$url" -Atc "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '$from')")
    left=$(psql "$url" -Atc "SELECT count(*) FROM invoices WHERE state <> 'completed'")
    # Each pgbench transaction completes 100 invoices; tps leaves out connecting.
    python3 -c 'import sys; v, r, tps, wal, n, left = sys.argv[1:]; print(f"{v}\t{r}\t{float(tps) * 100:.0f}\t{int(wal) // int(n)}\t{left}")' \
      "$v" "$round" "$tps" "$wal" "$rows" "$left" | tee -a "$results"
  done
done

python3 - "$results" "${variants[@]}" <<'PY'
import statistics, sys
runs = [line.split("\t") for line in open(sys.argv[1]).read().splitlines()]
variants = sys.argv[2:]
def rates(v): return [float(r[2]) for r in runs if r[0] == v]
base = statistics.median(rates(variants[0]))
print(f"\n| variant | invoices/s median (runs) | vs {variants[0]} | WAL B/invoice | left undone |")
print("|---|---|---|---|---|")
for v in variants:
    rs, mine = rates(v), [r for r in runs if r[0] == v]
    wal = statistics.median_low(int(r[3]) for r in mine)
    left = max(int(r[4]) for r in mine)
    print(f"| {v} | {statistics.median(rs):,.0f} ({', '.join(f'{x:,.0f}' for x in rs)}) "
          f"| {statistics.median(rs) / base:.2f} | {wal:,} | {left} |")
PY
