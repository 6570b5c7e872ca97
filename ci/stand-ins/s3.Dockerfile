# Stand-in for minio/minio (no registry here, and no S3 server binary installs on these machines):
# moto's standalone server (moto[server], PyPI) behind MinIO's command line (`minio server DIR
# --address :PORT`, ci/stand-ins/s3-server.py) and healthcheck (`mc ready local`,
# ci/stand-ins/s3-mc.sh). It speaks the S3 API but keeps the objects in memory and accepts any
# credentials. Built by ci/stand-ins/build.sh (the host's CA bundle mounted for pip); selected by
# S3_IMAGE in .env.
ARG BASE_IMAGE=localhost/debian:bookworm
FROM ${BASE_IMAGE}
ARG MOTO_VERSION=5.2.6
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_CONSTRAINT=
ARG HOST_CA_BUNDLE=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY containers/pip-sources.sh /opt/pip-sources.sh
RUN set -eu; \
    . /opt/pip-sources.sh; \
    python3 -m venv /opt/moto; \
    /opt/moto/bin/pip install "moto[server]==${MOTO_VERSION}"; \
    rm -f /tmp/host-ca.crt
COPY ci/stand-ins/s3-server.py /opt/moto/minio.py
COPY ci/stand-ins/s3-mc.sh /usr/local/bin/mc
USER 65534
EXPOSE 9000
ENTRYPOINT ["/opt/moto/bin/python", "/opt/moto/minio.py"]
CMD ["server", "/data"]
