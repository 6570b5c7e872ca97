# Stand-ins for prom/prometheus, prom/pushgateway and prom/node-exporter (no registry here):
# Debian's packages on the local base, each binary as the entry point like in the official images
# (compose.yaml passes the same flags), wget for the healthchecks, running as nobody.
# Built by ci/stand-ins/build.sh (--build-arg PACKAGE=... BINARY=...); selected by
# PROMETHEUS_IMAGE, PUSHGATEWAY_IMAGE, NODE_EXPORTER_IMAGE in .env.
ARG BASE_IMAGE=localhost/debian:bookworm
FROM ${BASE_IMAGE}
ARG PACKAGE=prometheus
ARG BINARY=prometheus
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$PACKAGE" wget \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && ln -s "/usr/bin/$BINARY" /usr/local/bin/stand-in \
    && mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER 65534
WORKDIR /prometheus
ENTRYPOINT ["/usr/local/bin/stand-in"]
