#!/usr/bin/env bash
# Usage: ci/build-image.sh DOCKERFILE TAG [podman build args...]   (CONTAINERS_CONF exported)
# `podman build` with the repository as context, on the local base image, with the host's pip
# sources (local wheels, file:// indexes, pip constraint, CA bundle) mounted read-only into RUN
# steps, so torch==2.13.0 (CPU) comes from the local wheel and not from a multi-GB download.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
[ $# -ge 2 ] || die "usage: $0 DOCKERFILE TAG [podman build args...]"
DOCKERFILE=$1 TAG=$2; shift 2
ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
args=(--build-arg "BASE_IMAGE=${BASE_IMAGE:-localhost/debian:bookworm}")
[ -s /etc/ssl/certs/ca-certificates.crt ] && args+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/host-ca.crt:ro --build-arg HOST_CA_BUNDLE=/etc/host-ca.crt)
[ -d /opt/wheels ] && args+=(-v /opt/wheels:/opt/wheels:ro --build-arg PIP_FIND_LINKS=/opt/wheels)
indexes=()
for root in /opt/pypi /opt/pypi-more; do   # index pages link to ../../files: mount whole trees
    [ -d "$root/simple" ] && { args+=(-v "$root:$root:ro"); indexes+=("file://$root/simple"); }
done
[ ${#indexes[@]} -gt 0 ] && args+=(--build-arg "PIP_EXTRA_INDEX_URL=${indexes[*]}")
[ -s /etc/xdg/pip/constraints.txt ] && args+=(-v /etc/xdg/pip/constraints.txt:/etc/host-pip-constraints.txt:ro --build-arg PIP_CONSTRAINT=/etc/host-pip-constraints.txt)
log "podman build -f $DOCKERFILE -t $TAG"
start=$SECONDS
nice -n 10 podman build --layers --network=host "${args[@]}" -f "$ROOT/$DOCKERFILE" -t "$TAG" "$@" "$ROOT" >&2
log "built $TAG in $((SECONDS - start)) s, $(podman image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
