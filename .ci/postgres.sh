# Sourced by .ci/run. `start_postgres` starts a throwaway PostgreSQL server on 127.0.0.1 (a free port, a data
# folder under /tmp), creates a user with a password and a database, and exports
# STL10_SEARCH_TEST_POSTGRES_URL=postgresql://USER:PASSWORD@127.0.0.1:PORT/DB for tests/test_postgres.py.
# The server is stopped and its folder removed when the calling shell exits. Safe to run again: each run
# gets its own folder and port.

_pg_bindir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [[ -z "$dir" ]]; then
    dir=$(dirname "$(command -v initdb 2>/dev/null || command -v pg_ctl 2>/dev/null || echo /nonexistent/x)")
  fi
  [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]] || { echo "postgres.sh: no PostgreSQL server binaries found (apt-get install postgresql)" >&2; return 1; }
  echo "$dir"
}

# Run a command as the PostgreSQL owner: `postgres` when we are root (root may not run the server), else ourselves.
_pg_as_owner() {
  if [[ $(id -u) -eq 0 ]]; then
    if command -v runuser >/dev/null 2>&1; then
      (cd / && runuser -u postgres -- "$@")
    else
      (cd / && su postgres -s /bin/sh -c "$(printf '%q ' "$@")")
    fi
  else
    "$@"
  fi
}

# A port nothing listens on (bash only: a fresh machine may lack python3 until the venv is made).
_pg_free_port() {
  local port attempt
  for attempt in $(seq 100); do
    port=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  echo "postgres.sh: no free port found" >&2
  return 1
}

stop_postgres() {
  if [[ -n "${_PG_DATADIR:-}" && -d "$_PG_DATADIR" ]]; then
    _pg_as_owner "$_PG_BINDIR/pg_ctl" -D "$_PG_DATADIR/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$_PG_DATADIR"
  fi
  _PG_DATADIR=""
}

start_postgres() {
  local bindir port datadir password user=stl10 db=stl10_search_test
  stop_postgres  # one server per shell: a second call replaces the first
  bindir=$(_pg_bindir) || return 1
  datadir=$(mktemp -d /tmp/stl10-postgres.XXXXXX)
  password=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
  if [[ $(id -u) -eq 0 ]]; then
    chown postgres:postgres "$datadir"
  fi
  chmod 700 "$datadir"
  _PG_BINDIR=$bindir
  _PG_DATADIR=$datadir
  trap stop_postgres EXIT

  # Local socket connections (in the data folder) are trusted, for the set-up below; TCP needs the password.
  _pg_as_owner "$bindir/initdb" -D "$datadir/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    --encoding=UTF8 --no-locale >"$datadir/initdb.log" 2>&1 \
    || { cat "$datadir/initdb.log" >&2; return 1; }
  local attempt
  for attempt in 1 2 3; do  # another process may take the port between the check and the start
    port=$(_pg_free_port) || return 1
    if _pg_as_owner "$bindir/pg_ctl" -D "$datadir/data" -l "$datadir/data/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $datadir -c fsync=off -c max_connections=200" start >/dev/null; then
      break
    fi
    [[ $attempt -lt 3 ]] || { cat "$datadir/data/server.log" >&2; return 1; }
  done
  _pg_as_owner "$bindir/psql" -h "$datadir" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -q \
    -c "CREATE ROLE $user LOGIN PASSWORD '$password'" -c "CREATE DATABASE $db OWNER $user" >/dev/null || return 1

  export STL10_SEARCH_TEST_POSTGRES_URL="postgresql://$user:$password@127.0.0.1:$port/$db"
  echo "PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port, database $db (data in $datadir)"
}
