# Stand-in for the official postgres image (no registry here): Debian's PostgreSQL 15 on the local
# base, with an entry point that reads the same variables (POSTGRES_USER, POSTGRES_PASSWORD,
# POSTGRES_DB, PGDATA) and runs /docker-entrypoint-initdb.d/*.sh|*.sql on an empty data folder.
# Built by ci/stand-ins/build.sh; selected by POSTGRES_IMAGE in .env.
ARG BASE_IMAGE=localhost/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /docker-entrypoint-initdb.d /var/run/postgresql \
    && chown postgres:postgres /var/run/postgresql
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PGDATA=/var/lib/postgresql/data
COPY ci/stand-ins/postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["postgres"]
