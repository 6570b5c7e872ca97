# MLflow tracking server of the compose stack: `mlflow server` with its backend store in the stack's
# Postgres (database mlflow) and proxied artifact serving (--serve-artifacts), so the stage
# containers upload models over HTTP and need no access to the artifact volume.
# Build (context: the repository root):
#   docker compose build mlflow
#   docker build -f containers/mlflow.Dockerfile -t helixflow-mlflow:3.17.2 .
# The version matches the stages' mlflow-skinny client (pyproject.toml).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG2_VERSION=2.9.13
ARG MLFLOW_UID=50001
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG HOST_CA_BUNDLE=

ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/mlflow-venv \
    PATH=/opt/mlflow-venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

RUN set -eu; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    apt-get install -y --no-install-recommends python3 python3-venv ca-certificates curl tini; \
    apt-get clean; rm -rf /var/lib/apt/lists/*; \
    python3 -m venv /opt/mlflow-venv

COPY containers/pip-sources.sh /opt/pip-sources.sh
RUN set -eu; \
    . /opt/pip-sources.sh; \
    pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary==${PSYCOPG2_VERSION}"; \
    rm -f /tmp/host-ca.crt; \
    mlflow --version; \
    useradd --uid "${MLFLOW_UID}" --home-dir /mlflow --create-home --shell /usr/sbin/nologin mlflow; \
    mkdir -p /mlflow/artifacts; \
    chown -R mlflow:mlflow /mlflow

USER ${MLFLOW_UID}
WORKDIR /mlflow
EXPOSE 5000
HEALTHCHECK --interval=10s --timeout=5s --retries=12 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:5000/health"]
ENTRYPOINT ["/usr/bin/tini", "--", "mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]
