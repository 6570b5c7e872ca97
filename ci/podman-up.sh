#!/usr/bin/env bash
# Usage: eval "$(ci/podman-up.sh STATE_DIR)"
# Starts `podman system service` (Docker API) on unix://STATE_DIR/podman.sock, PID in
# STATE_DIR/podman.pid, log in STATE_DIR/podman.log; installs podman/runc if missing.
# Prints `export CONTAINERS_CONF=... DOCKER_HOST=...`; every podman CLI call needs CONTAINERS_CONF.
# PODMAN_STORAGE_DIR=DIR: images and containers under DIR instead of podman's default storage
# (then CONTAINERS_STORAGE_CONF is exported too).
# A running service that answers /_ping is reused. Stop it with ci/podman-down.sh STATE_DIR.
# Before it returns, aardvark-dns files of helixflow networks left by a killed stack are removed
# (drop_stale_dns_files in ci/lib.sh).
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
[ $# -eq 1 ] || die "usage: $0 STATE_DIR"
mkdir -p -- "$1"
STATE=$(cd -- "$1" && pwd -P)
SOCK=$STATE/podman.sock
[ "${#SOCK}" -lt 108 ] || die "socket path longer than 107 bytes: $SOCK"
ensure_apt "podman runc curl" podman runc curl
write_containers_conf "$STATE/containers.conf" "$STATE"
export CONTAINERS_CONF=$STATE/containers.conf
storage=
if [ -n "${PODMAN_STORAGE_DIR:-}" ]; then
    write_storage_conf "$STATE/storage.conf" "$PODMAN_STORAGE_DIR"
    export CONTAINERS_STORAGE_CONF=$STATE/storage.conf
    storage=$(printf ' CONTAINERS_STORAGE_CONF=%q' "$CONTAINERS_STORAGE_CONF")
fi
exports() { printf 'export CONTAINERS_CONF=%q DOCKER_HOST=%q%s\n' "$CONTAINERS_CONF" "unix://$SOCK" "$storage"; }

if [ -f "$STATE/podman.pid" ] && pid_is "$(cat "$STATE/podman.pid")" "$SOCK" && ping_socket "$SOCK"; then
    log "podman service already running (pid $(cat "$STATE/podman.pid"))"
    exports; exit 0
fi
rm -f "$SOCK" "$STATE/podman.pid"
# setsid: its own session, so a Ctrl-C in the caller's process group does not stop it.
setsid podman system service --time=0 "unix://$SOCK" </dev/null >>"$STATE/podman.log" 2>&1 &
pid=$!
echo "$pid" >"$STATE/podman.pid"
deadline=$((SECONDS + ${PODMAN_WAIT_S:-60}))
until ping_socket "$SOCK"; do
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$STATE/podman.log" >&2; die "podman service exited"; }
    [ "$SECONDS" -lt "$deadline" ] || { kill "$pid"; die "podman socket did not answer; see $STATE/podman.log"; }
    sleep 0.2
done
log "podman service ready (pid $pid) on unix://$SOCK"
drop_stale_dns_files
exports
