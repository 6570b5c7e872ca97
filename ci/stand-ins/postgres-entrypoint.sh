#!/bin/bash
# Entry point of the Postgres stand-in: what the official image's entry point does that compose.yaml
# relies on. As root it prepares PGDATA and re-executes itself as postgres; an empty PGDATA is
# initialised with POSTGRES_USER (superuser, password POSTGRES_PASSWORD, scram-sha-256 over TCP)
# and POSTGRES_DB, then the init scripts run against a server listening on its socket only.
set -euo pipefail
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}"
POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
if [ "${1:0:1}" = - ]; then set -- postgres "$@"; fi
if [ "$1" != postgres ]; then exec "$@"; fi

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 -D "$PGDATA" >/dev/null
    printf 'host all all all scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    psql=(psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password --no-psqlrc)
    if [ "$POSTGRES_DB" != postgres ]; then
        "${psql[@]}" --dbname postgres --set db="$POSTGRES_DB" <<<'CREATE DATABASE :"db";' >/dev/null
    fi
    export POSTGRES_USER POSTGRES_DB
    for script in /docker-entrypoint-initdb.d/*; do
        case $script in
            *.sh) echo "postgres stand-in: running $script"; bash "$script" ;;
            *.sql) echo "postgres stand-in: running $script"; "${psql[@]}" --dbname "$POSTGRES_DB" -f "$script" ;;
            *) ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "postgres stand-in: initialised $PGDATA (database $POSTGRES_DB, user $POSTGRES_USER)"
fi
exec postgres -c listen_addresses='*' "${@:2}"
