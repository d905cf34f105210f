# Shared by the benchmark scripts: cleanup on exit, a database server, and
# a service on a port. Source it from the repository root.

# Cleanups run in reverse order on exit, however the script ends.
cleanups=()
on_exit() { for ((i = ${#cleanups[@]} - 1; i >= 0; i--)); do eval "${cleanups[i]}" || true; done; }
trap on_exit EXIT

# The admin URL of the server to use: ADMIN_URL, or a private cluster that
# bench/pg.sh starts now and stops on exit.
bench_admin_url() {
  if [ -n "${ADMIN_URL:-}" ]; then
    admin=$ADMIN_URL
  else
    admin=$(bench/pg.sh up)
    cleanups+=("bench/pg.sh down")
  fi
}

# Starts the release service on a fresh database: start_service NAME PORT.
# Sets $url (the database) and $server (the pid); both go away on exit.
start_service() {
  local db=$1 port=$2
  url=${admin%/*}/$db
  psql "$admin" -qc "CREATE DATABASE $db" >/dev/null
  DATABASE_URL=$url BC_LISTEN_ADDR=127.0.0.1:$port BC_METRICS_ADDR=off BC_MIGRATE=true RUST_LOG=warn \
    target/release/billing-coordinator serve 2>>"${SERVICE_LOG:-/dev/null}" &
  server=$!
  cleanups+=("kill $server 2>/dev/null; wait $server 2>/dev/null; psql '$admin' -qc 'DROP DATABASE IF EXISTS $db' >/dev/null")
  for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "the service on port $port did not start" >&2
  return 1
}
