#!/usr/bin/env bash
# Usage: ci/podman-down.sh STATE_DIR
# Removes containers labelled ${CI_CONTAINER_LABEL:-helixflow.test=1} and this state's networks
# (with what is still on them), then stops the podman service whose PID is in
# STATE_DIR/podman.pid (TERM, then KILL after 10 s). Images are kept.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
[ $# -eq 1 ] || die "usage: $0 STATE_DIR"
[ -d "$1" ] || exit 0
STATE=$(cd -- "$1" && pwd -P)
SOCK=$STATE/podman.sock
[ -f "$STATE/containers.conf" ] && export CONTAINERS_CONF=$STATE/containers.conf
[ -f "$STATE/storage.conf" ] && export CONTAINERS_STORAGE_CONF=$STATE/storage.conf
if command -v podman >/dev/null; then
    ids=$(podman ps -aq --filter "label=${CI_CONTAINER_LABEL:-helixflow.test=1}" 2>/dev/null || true)
    # shellcheck disable=SC2086
    [ -z "$ids" ] || { log "removing containers $(echo $ids)"; podman rm -f -t 0 $ids >/dev/null || true; }
    # Every network here is this state's (its own network_config_dir). Removing them, with any
    # container still on them, has netavark take down their bridges and port-forwarding rules,
    # which outlive the state folder otherwise.
    nets=$(podman network ls --format '{{.Name}}' 2>/dev/null | grep -vx podman || true)
    # shellcheck disable=SC2086
    [ -z "$nets" ] || { log "removing networks $(echo $nets)"; podman network rm -f $nets >/dev/null || true; }
fi
if [ -f "$STATE/podman.pid" ]; then
    pid=$(cat "$STATE/podman.pid")
    if pid_is "$pid" "$SOCK"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do pid_is "$pid" "$SOCK" || break; sleep 0.2; done
        pid_is "$pid" "$SOCK" && { log "podman pid $pid ignored TERM; KILL"; kill -KILL "$pid" || true; }
    fi
    rm -f "$STATE/podman.pid"
fi
rm -f "$SOCK"
