#!/usr/bin/env bash
# Usage: ci/podman-healthchecks.sh STATE_DIR        (podman CLI environment exported)
#        ci/podman-healthchecks.sh --stop STATE_DIR
# podman runs container healthchecks from systemd timers; without systemd (these machines) they
# never run, health stays "starting" and `docker compose up --wait` waits forever. This loop runs
# them instead, in the background: every 2 s for a container that is not healthy yet, every 30 s
# once it is (docker's default interval). PID in STATE_DIR/healthchecks.pid, log next to it;
# --stop ends it by that PID.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
if [ "${1:-}" = --stop ]; then
    pidfile=$2/healthchecks.pid
    if [ -f "$pidfile" ] && pid_is "$(cat "$pidfile")" podman-healthchecks; then kill "$(cat "$pidfile")"; fi
    rm -f "$pidfile"; exit 0
fi
[ $# -eq 1 ] || die "usage: $0 STATE_DIR | --stop STATE_DIR"
STATE=$(cd -- "$1" && pwd -P)
if [ -f "$STATE/healthchecks.pid" ] && pid_is "$(cat "$STATE/healthchecks.pid")" podman-healthchecks; then
    log "healthcheck loop already running (pid $(cat "$STATE/healthchecks.pid"))"; exit 0
fi
check() {  # one healthcheck, its output logged when it fails
    local result
    result=$(podman healthcheck run "$1" </dev/null 2>&1) || echo "$(date -u +%T) $1: ${result:-unhealthy}"
}
loop() {
    # Checks run in the background, one at a time per container: a slow one (e.g. `airflow jobs
    # check`, tens of seconds on a loaded machine) holds up no other container's.
    declare -A last=() running=()
    while :; do
        now=$SECONDS
        while read -r id status; do
            [ -n "$id" ] || continue
            case $status in
                *"(healthy)"*) [ $((now - ${last[$id]:-0})) -ge 30 ] || continue ;;
                *"(starting)"* | *"(unhealthy)"*) ;;
                *) continue ;;   # no healthcheck
            esac
            if [ -n "${running[$id]:-}" ] && kill -0 "${running[$id]}" 2>/dev/null; then continue; fi
            last[$id]=$now
            check "$id" &
            running[$id]=$!
        done < <(podman ps --format '{{.ID}} {{.Status}}' 2>/dev/null)
        sleep 2
    done
}
# The loop's own command line names it, so that --stop finds it by PID and name.
export -f loop check log
setsid bash -c 'loop' podman-healthchecks </dev/null >>"$STATE/healthchecks.log" 2>&1 &
echo $! >"$STATE/healthchecks.pid"
log "healthcheck loop running (pid $!), log $STATE/healthchecks.log"
