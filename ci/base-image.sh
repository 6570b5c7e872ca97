#!/usr/bin/env bash
# Usage: ci/base-image.sh   (CONTAINERS_CONF exported, see podman-up.sh)
# Makes sure podman holds ${BASE_IMAGE:-localhost/debian:bookworm} without a registry:
# in storage already -> done; else the cached rootfs tarball (~/.cache/helixflow) is imported;
# else debootstrap --variant=minbase bookworm builds it (about 30 s), cached for next time.
# Prints the image name.
set -euo pipefail
. "$(dirname -- "${BASH_SOURCE[0]}")/lib.sh"
IMAGE=${BASE_IMAGE:-localhost/debian:bookworm}
CACHE=${HELIXFLOW_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/helixflow}
MIRROR=${DEB_MIRROR:-http://deb.debian.org/debian}
TARBALL=$CACHE/debian-bookworm-minbase-rootfs.tar
ensure_apt "podman debootstrap" podman runc debootstrap
if podman image exists "$IMAGE"; then echo "$IMAGE"; exit 0; fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.base-image.lock"; flock 9   # one builder at a time on a shared machine
if [ ! -s "$TARBALL" ]; then
    [ "$(id -u)" = 0 ] || die "debootstrap needs root"
    ROOT=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf -- "$ROOT"' EXIT
    log "debootstrap --variant=minbase bookworm (log $CACHE/debootstrap.log)"
    debootstrap --variant=minbase bookworm "$ROOT" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -n 20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed"; }
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
        "$MIRROR" "$MIRROR" >"$ROOT/etc/apt/sources.list"
    printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\nAcquire::Languages "none";\n' \
        >"$ROOT/etc/apt/apt.conf.d/90container"
    rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/log/* "$ROOT"/dev/* "$ROOT"/proc/* "$ROOT"/sys/*
    : >"$ROOT/etc/resolv.conf"; : >"$ROOT/etc/hostname"
    tar --numeric-owner -C "$ROOT" -cf "$TARBALL.tmp" . && mv -f "$TARBALL.tmp" "$TARBALL"
fi
podman import --quiet --change 'CMD ["/bin/bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' "$TARBALL" "$IMAGE" >/dev/null
echo "$IMAGE"
