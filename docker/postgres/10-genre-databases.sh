#!/usr/bin/env bash
# First-start initialisation of the stack's Postgres (run by the postgres image from
# /docker-entrypoint-initdb.d/, only when the data volume is empty).
#
# Creates one login role and one database per service, each owned by its role, and revokes
# the default PUBLIC connect right, so Airflow's role cannot open MLflow's databases and the
# other way round:
#   airflow      role $AIRFLOW_DB_USER (default airflow), password $AIRFLOW_DB_PASSWORD
#   mlflow       role $MLFLOW_DB_USER (default mlflow),   password $MLFLOW_DB_PASSWORD
#   mlflow_auth  the MLflow basic-auth user store, same role as mlflow
# Passwords are read from the environment inside psql (\getenv, psql >= 15) and quoted by
# psql (:'var'): they never appear on a command line or in the SQL text sent from here.
set -euo pipefail
: "${AIRFLOW_DB_PASSWORD:?AIRFLOW_DB_PASSWORD is not set}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"
export AIRFLOW_DB_USER="${AIRFLOW_DB_USER:-airflow}" MLFLOW_DB_USER="${MLFLOW_DB_USER:-mlflow}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-postgres}" <<'SQL'
\getenv airflow_user AIRFLOW_DB_USER
\getenv airflow_pw AIRFLOW_DB_PASSWORD
\getenv mlflow_user MLFLOW_DB_USER
\getenv mlflow_pw MLFLOW_DB_PASSWORD
CREATE ROLE :"airflow_user" LOGIN PASSWORD :'airflow_pw';
CREATE ROLE :"mlflow_user" LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE airflow OWNER :"airflow_user";
CREATE DATABASE mlflow OWNER :"mlflow_user";
CREATE DATABASE mlflow_auth OWNER :"mlflow_user";
REVOKE ALL ON DATABASE airflow FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow_auth FROM PUBLIC;
SQL
echo "genre: databases airflow (owner $AIRFLOW_DB_USER), mlflow and mlflow_auth (owner $MLFLOW_DB_USER) created"
