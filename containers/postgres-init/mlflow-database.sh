#!/bin/bash
# Run once by the Postgres entry point on an empty data volume (/docker-entrypoint-initdb.d):
# the MLflow server's own user and database beside Airflow's.
set -euo pipefail
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD must be set (ci/make-env.sh)}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" --set pw="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE USER mlflow WITH PASSWORD :'pw';
CREATE DATABASE mlflow OWNER mlflow;
SQL
