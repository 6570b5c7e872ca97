# Airflow image for the compose stack: Airflow 3.3.2 + providers-docker 4.6.1 + the Postgres
# driver + airflow-exporter (Prometheus metrics at the api-server's /admin/metrics/) + boto3 (the
# S3 inbox lists its prefix, the upload task puts s3:// inputs' results; no Amazon provider). None of the
# model stack: the DAG's stage tasks run in the helixflow image through the Docker API (the socket
# proxy); the DAG imports only helixflow's light modules (step table, profiles). The DAGs, plugins
# and profiles are mounted (compose.yaml) or baked in below.
# Build (context: the repository root):
#   docker compose build airflow-init        # as compose.yaml builds it
#   docker build -f containers/airflow.Dockerfile -t helixflow-airflow:3.3.2 .
#   ci/build-image.sh containers/airflow.Dockerfile localhost/helixflow-airflow:3.3.2   # podman
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG AIRFLOW_VERSION=3.3.2
ARG DOCKER_PROVIDER_VERSION=4.6.1
ARG PSYCOPG2_VERSION=2.9.13
ARG AIRFLOW_EXPORTER_VERSION=2.1.0
ARG BOTO3_VERSION=1.44.18
ARG AIRFLOW_UID=50000
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_CONSTRAINT=
ARG HOST_CA_BUNDLE=

ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/airflow-venv \
    PATH=/opt/airflow-venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/airflow/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/airflow/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    HELIXFLOW_PROFILES_DIR=/opt/airflow/profiles

RUN set -eu; \
    apt_opts=""; [ -f "$HOST_CA_BUNDLE" ] && apt_opts="-o Acquire::https::CAInfo=$HOST_CA_BUNDLE"; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get $apt_opts update; \
    apt-get $apt_opts install -y --no-install-recommends python3 python3-venv ca-certificates curl tini; \
    apt-get clean; rm -rf /var/lib/apt/lists/*; \
    python3 -m venv /opt/airflow-venv

COPY containers/airflow-constraints.txt /opt/airflow-constraints.txt
COPY containers/pip-sources.sh /opt/pip-sources.sh
# Airflow's constraints approach: every transitive version fixed by a constraints file
# (containers/airflow-constraints.txt, resolved and tested by the Makefile's .venv-airflow).
RUN set -eu; \
    . /opt/pip-sources.sh; \
    unset PIP_CONSTRAINT; \
    pip install --constraint /opt/airflow-constraints.txt \
        "apache-airflow==${AIRFLOW_VERSION}" "apache-airflow-providers-docker==${DOCKER_PROVIDER_VERSION}" \
        "psycopg2-binary==${PSYCOPG2_VERSION}" "airflow-exporter==${AIRFLOW_EXPORTER_VERSION}" "boto3==${BOTO3_VERSION}"; \
    rm -f /tmp/host-ca.crt; \
    airflow version
# Airflow 3 opens an async engine too: asyncpg for postgresql:// URLs (the stack's Postgres). A
# layer of its own, so changing it does not rerun the one above (minutes).
ARG ASYNCPG_VERSION=0.32.0
RUN set -eu; \
    . /opt/pip-sources.sh; \
    pip install "asyncpg==${ASYNCPG_VERSION}"; \
    rm -f /tmp/host-ca.crt

# helixflow itself, without its dependencies: the DAG reads the step table and loads profiles with
# the workflow's own code (jsonschema and PyYAML come with Airflow). A plain install of the package
# (not a copy on PYTHONPATH): helixflow/__init__ reads its version from the installed metadata, and
# the profile schema and profiles are package data. Its own layer, after Airflow's, so code changes rebuild little.
COPY pyproject.toml README.md /opt/helixflow/
COPY src /opt/helixflow/src
RUN set -eu; \
    . /opt/pip-sources.sh; \
    pip install --no-deps /opt/helixflow; \
    rm -rf /tmp/host-ca.crt /opt/helixflow; \
    python -c "import helixflow.profiles, helixflow.steps"

COPY airflow/dags /opt/airflow/dags
COPY airflow/plugins /opt/airflow/plugins
COPY src/helixflow/data/profiles /opt/airflow/profiles
RUN useradd --uid "${AIRFLOW_UID}" --gid 0 --home-dir /opt/airflow --shell /bin/bash airflow \
    && mkdir -p /opt/airflow/logs /opt/airflow/auth \
    && chown -R "${AIRFLOW_UID}:0" /opt/airflow \
    && chmod -R g+rwX /opt/airflow

USER ${AIRFLOW_UID}
WORKDIR /opt/airflow
ENTRYPOINT ["/usr/bin/tini", "--", "airflow"]
CMD ["version"]
