#!/usr/bin/env bash
# Where a drain's WAL goes: one service burn-down on a private PostgreSQL,
# then pg_waldump over exactly the drain (from loadgen's `wal_lsn`), printed
# per invoice by record type: heap updates, row locks, audit inserts, index
# entries, and the full-page images that ride on them. This is the profile
# behind the `WAL bytes / invoice` column of bench/run.sh.
#
#   bench/walprofile.sh                                  # B = 100, 100,000 invoices
#   bench/walprofile.sh --batch 1 --invoices 30000       # any loadgen burn-down flags
#
# Always a private cluster (bench/pg.sh), since pg_waldump reads the WAL files
# themselves; it keeps them (wal_keep_size) until the drain has been read.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/common.sh
port=${PORT:-50071}
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--batch 100 --invoices 100000)

cargo build --release --bins -q
unset ADMIN_URL
BENCH_PG_OPTS="${BENCH_PG_OPTS:-} -c wal_keep_size=4GB" bench_admin_url
start_service "bc_walprofile_$$" "$port"
result=$(target/release/loadgen --addr "http://127.0.0.1:$port" --service-pid "$server" \
  --database-url "$url" --label walprofile --mode burn-down "${args[@]}" | sed -n 's/^RESULT //p')

read -r from to invoices < <(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["wal_lsn"]["from"], r["wal_lsn"]["to"], r["invoices"])' "$result")
bench/pg.sh waldump -s "$from" -e "$to" --stats=record |
  python3 -c '
import json, re, sys
result, invoices = json.loads(sys.argv[1]), int(sys.argv[2])
rows = []
for line in sys.stdin:
    m = re.match(r"(\S+/\S+)\s+(\d+)\s+\(\s*[\d.]+\)\s+(\d+)\s+\(\s*[\d.]+\)\s+(\d+)", line)
    if m:
        kind, n, rec, fpi = m[1], int(m[2]), int(m[3]), int(m[4])
        rows.append((rec + fpi, kind, n, rec, fpi))
rows.sort(reverse=True)
total = sum(r[0] for r in rows)
rate, start, end = result["invoices_per_s"], result["wal_lsn"]["from"], result["wal_lsn"]["to"]
print(f"{invoices:,} invoices drained at {rate:,.0f}/s; WAL {total / invoices:,.0f} B per invoice "
      f"(pg_waldump {start}..{end})")
print()
print("| record | per invoice | record bytes | full-page image bytes | total bytes | share |")
print("|---|---|---|---|---|---|")
for size, kind, n, rec, fpi in rows:
    if size / total < 0.002:
        continue
    print(f"| {kind} | {n / invoices:.2f} | {rec / invoices:,.0f} | {fpi / invoices:,.0f} "
          f"| {size / invoices:,.0f} | {100 * size / total:.0f}% |")
' "$result" "$invoices"
