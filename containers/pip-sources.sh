# Sourced (POSIX sh) by the Dockerfiles' pip steps. The build's pip sources come in as build args:
# empty ones are unset (an empty PIP_FIND_LINKS is not "none" to pip), and HOST_CA_BUNDLE, when
# set, is the CA bundle pip trusts for HTTPS: a file mounted into the build (podman build -v) or
# an http:// URL (ci/wheel-server.sh: `docker compose build` cannot mount), fetched to /tmp.
for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CONSTRAINT; do
    eval "[ -n \"\${$v:-}\" ]" || unset "$v"
done
case "${HOST_CA_BUNDLE:-}" in
    http://*)
        python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
            "$HOST_CA_BUNDLE" /tmp/host-ca.crt
        export PIP_CERT=/tmp/host-ca.crt ;;
    ?*) export PIP_CERT="$HOST_CA_BUNDLE" ;;
esac
