#!/bin/sh
# Stand-in for `mc ready local`, the healthcheck of compose.yaml's s3 service (MinIO's image has mc,
# not curl): succeeds when the server's liveness endpoint answers (ci/stand-ins/s3-server.py).
set -eu
if [ "$*" != "ready local" ]; then
    echo "mc stand-in: only 'mc ready local'" >&2
    exit 2
fi
exec python3 -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:9000/minio/health/live", timeout=5)'
