#!/usr/bin/env bash
# A private, throwaway PostgreSQL for the benchmarks, so that figures never
# depend on how the machine's own server is configured (autovacuum off, say).
#
#   bench/pg.sh up     # prints its admin URL
#   bench/pg.sh down
#   bench/pg.sh waldump ARGS...   # pg_waldump over the cluster's WAL files
#
# Settings: the PostgreSQL defaults (fsync, synchronous_commit and autovacuum
# on) with max_connections = 200 and shared_buffers = 256MB, the same as the
# peer systems are measured with. Data lives in $BENCH_PG_DIR (default
# /tmp/bc-bench-pg), re-created on every start; port $BENCH_PG_PORT (55433).
set -euo pipefail
dir=${BENCH_PG_DIR:-/tmp/bc-bench-pg}
port=${BENCH_PG_PORT:-55433}
bin=$(pg_config --bindir 2>/dev/null || true)
[ -x "$bin/initdb" ] || bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
# initdb and postgres refuse to run as root.
if [ "$(id -u)" = 0 ]; then as=(runuser -u postgres --); else as=(); fi

case ${1:-} in
up)
  if [ -f "$dir/data/postmaster.pid" ]; then "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true; fi
  rm -rf "$dir"; mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir"
  "${as[@]}" "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C >"$dir/initdb.log" 2>&1
  "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200 -c shared_buffers=256MB ${BENCH_PG_OPTS:-}" start >/dev/null
  echo "postgres://postgres@127.0.0.1:$port/postgres"
  ;;
down)
  if [ -f "$dir/data/postmaster.pid" ]; then "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null; fi
  rm -rf "$dir"
  ;;
waldump)
  shift
  "${as[@]}" "$bin/pg_waldump" -p "$dir/data/pg_wal" "$@"
  ;;
*)
  echo "usage: bench/pg.sh up|down|waldump ARGS..." >&2; exit 2 ;;
esac
