# Docker API guard (src/helixflow_guard): the only service that sees the engine's socket. It reads
# each Docker API request (path, query, create body) and passes on only what helixflow's DAG needs
# (docs/airflow.md, Security). Python's standard library only: no pip, nothing but python3.
# Build (context: the repository root):
#   docker build -f containers/docker-guard.Dockerfile -t helixflow-docker-guard:0.1.0 .
#   ci/build-image.sh containers/docker-guard.Dockerfile localhost/helixflow-docker-guard:0.1.0   # podman
# Run: non-root (uid GUARD_UID); give it the socket's group (compose: group_add: [<the socket's gid>]):
#   docker run -v /var/run/docker.sock:/var/run/docker.sock:ro --group-add "$(stat -c %g /var/run/docker.sock)" \
#       -e HELIXFLOW_IMAGE=helixflow:0.1.0 -e HELIXFLOW_DATA_DIR=/srv/data -e HELIXFLOW_RESULTS_DIR=/srv/results \
#       helixflow-docker-guard:0.1.0
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG GUARD_UID=2375
ARG HOST_CA_BUNDLE=

ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/opt/helixflow-guard

RUN set -eu; \
    apt_opts=""; [ -f "$HOST_CA_BUNDLE" ] && apt_opts="-o Acquire::https::CAInfo=$HOST_CA_BUNDLE"; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get $apt_opts update; \
    apt-get $apt_opts install -y --no-install-recommends python3; \
    apt-get clean; rm -rf /var/lib/apt/lists/*; \
    useradd --system --uid "${GUARD_UID}" --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin guard

COPY src/helixflow_guard /opt/helixflow-guard/helixflow_guard

USER ${GUARD_UID}
EXPOSE 2375
# PID 1 is Python itself: it handles SIGTERM (asyncio signal handler) and stops at once.
ENTRYPOINT ["python3", "-m", "helixflow_guard"]
