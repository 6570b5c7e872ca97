#!/usr/bin/env bash
# Usage: ci/wheel-server.sh STATE_DIR [ENV_FILE]   |   ci/wheel-server.sh --stop STATE_DIR
# `docker compose build` cannot mount host folders into build steps, so the machine's pip sources
# reach them over HTTP: python -m http.server on 127.0.0.1 (builds use `network: host`) serves the
# local wheels (/opt/wheels), the local file indexes (/opt/pypi*), and the host CA bundle (HTTPS to
# PyPI is intercepted on these machines). Appends the build variables compose.yaml passes as build
# args to ENV_FILE (default: print them): PIP_FIND_LINKS, PIP_EXTRA_INDEX_URL, HOST_CA_BUNDLE
# (a URL) and TORCH_INDEX_URL (PyPI: the local +cpu wheel wins over PyPI's CUDA build of the same
# version). PID in STATE_DIR/wheel-server.pid; --stop ends it by that PID. WHEEL_SERVER_PORT: the
# port (default: a free one).
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
if [ "${1:-}" = --stop ]; then
    pidfile=$2/wheel-server.pid
    if [ -f "$pidfile" ] && pid_is "$(cat "$pidfile")" http.server; then kill "$(cat "$pidfile")"; fi
    rm -f "$pidfile"; exit 0
fi
[ $# -ge 1 ] || die "usage: $0 STATE_DIR [ENV_FILE]"
mkdir -p "$1/wheel-root"
STATE=$(cd -- "$1" && pwd -P)
ROOT=$STATE/wheel-root
[ -d /opt/wheels ] && ln -sfn /opt/wheels "$ROOT/wheels"
indexes=()
for tree in /opt/pypi /opt/pypi-more; do   # index pages link to ../../files: serve whole trees
    [ -d "$tree/simple" ] && { ln -sfn "$tree" "$ROOT/${tree##*/}"; indexes+=("${tree##*/}"); }
done
[ -s /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$ROOT/ca-certificates.crt"
if ! { [ -f "$STATE/wheel-server.pid" ] && pid_is "$(cat "$STATE/wheel-server.pid")" http.server; }; then
    # WHEEL_SERVER_PORT: a fixed port keeps the build args, and so the image layers, cached across runs.
    port=${WHEEL_SERVER_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
    setsid python3 -m http.server --bind 127.0.0.1 --directory "$ROOT" "$port" </dev/null >"$STATE/wheel-server.log" 2>&1 &
    echo $! >"$STATE/wheel-server.pid"
    echo "$port" >"$STATE/wheel-server.port"
    deadline=$((SECONDS + 60))
    until curl -fs -o /dev/null "http://127.0.0.1:$port/"; do
        [ "$SECONDS" -lt "$deadline" ] || die "wheel server did not answer in 60 s"
        pid_is "$(cat "$STATE/wheel-server.pid")" http.server || die "wheel server exited: $(cat "$STATE/wheel-server.log")"
        sleep 0.2
    done
    log "wheel server on http://127.0.0.1:$port (pid $(cat "$STATE/wheel-server.pid"))"
fi
url=http://127.0.0.1:$(cat "$STATE/wheel-server.port")
{
    echo "# build sources served by ci/wheel-server.sh"
    [ -d "$ROOT/wheels" ] && echo "PIP_FIND_LINKS=$url/wheels/"
    [ ${#indexes[@]} -gt 0 ] && echo "PIP_EXTRA_INDEX_URL=$(printf "$url/%s/simple " "${indexes[@]}" | sed 's/ $//')"
    [ -f "$ROOT/ca-certificates.crt" ] && echo "HOST_CA_BUNDLE=$url/ca-certificates.crt"
    echo "TORCH_INDEX_URL=https://pypi.org/simple"
} >"$STATE/wheel-server.env"
if [ $# -ge 2 ]; then cat "$STATE/wheel-server.env" >>"$2"; else cat "$STATE/wheel-server.env"; fi
