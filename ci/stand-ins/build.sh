#!/usr/bin/env bash
# Usage: ci/stand-ins/build.sh [ENV_FILE]   (podman CLI environment exported, see ci/podman-up.sh)
# Builds the stand-ins of the third-party images compose.yaml uses (no registry on the CI and
# development machines): Postgres, Prometheus, Pushgateway and node-exporter,
# from Debian's packages on the local base image (ci/base-image.sh), and MinIO's: moto's S3 server
# from PyPI (pip trusts the host's CA bundle, mounted into the build). Appends the *_IMAGE lines that
# select them to ENV_FILE (default: print them). Cached layers make a second build take seconds.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/../lib.sh"
ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd -P)
BASE=${BASE_IMAGE:-localhost/debian:bookworm}
PREFIX=${STAND_IN_PREFIX:-localhost/helixflow-stand-in}
build() {  # build TAG DOCKERFILE [build args...]
    local tag=$1 file=$2 start=$SECONDS; shift 2
    nice -n 10 podman build --layers --network=host --build-arg "BASE_IMAGE=$BASE" "$@" \
        -f "$ROOT/ci/stand-ins/$file" -t "$tag" "$ROOT" >&2 || die "stand-in $tag failed to build"
    log "stand-in $tag built in $((SECONDS - start)) s"
}
build "$PREFIX-postgres:15" postgres.Dockerfile
build "$PREFIX-prometheus:2.42" prometheus.Dockerfile --build-arg PACKAGE=prometheus --build-arg BINARY=prometheus
build "$PREFIX-pushgateway:1.5" prometheus.Dockerfile --build-arg PACKAGE=prometheus-pushgateway \
    --build-arg BINARY=prometheus-pushgateway
build "$PREFIX-node-exporter:1.5" prometheus.Dockerfile --build-arg PACKAGE=prometheus-node-exporter \
    --build-arg BINARY=prometheus-node-exporter
build "$PREFIX-s3:moto-5.2.6" s3.Dockerfile --build-arg MOTO_VERSION=5.2.6 \
    -v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg HOST_CA_BUNDLE=/run/host-ca.crt
lines=$(cat <<LINES
# stand-ins built by ci/stand-ins/build.sh
POSTGRES_IMAGE=$PREFIX-postgres:15
PROMETHEUS_IMAGE=$PREFIX-prometheus:2.42
PUSHGATEWAY_IMAGE=$PREFIX-pushgateway:1.5
NODE_EXPORTER_IMAGE=$PREFIX-node-exporter:1.5
S3_IMAGE=$PREFIX-s3:moto-5.2.6
LINES
)
if [ $# -ge 1 ]; then printf '%s\n' "$lines" >>"$1"; else printf '%s\n' "$lines"; fi
