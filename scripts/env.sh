# Environment shared by the Makefile, .ci/run and the Airflow workers (source it).
# Everything runs offline: models load from local folders, never from a hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
export TOKENIZERS_PARALLELISM=false
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
export OMP_WAIT_POLICY=PASSIVE  # 2 torch threads on a loaded 2-core box spin otherwise (5-8x slower)
# Airflow: the project's own home (never ~/airflow), so a hand-typed `airflow ...` after
# `source scripts/env.sh` talks to the same metadata DB as scripts/airflow.sh (which sets the rest:
# executor, loopback API, low parallelism; `eval "$(bash scripts/airflow.sh env)"` for all of it).
_genre_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export AIRFLOW_HOME="${GENRE_AIRFLOW_HOME:-$_genre_root/airflow_home}"
export AIRFLOW__CORE__DAGS_FOLDER="${AIRFLOW__CORE__DAGS_FOLDER:-$_genre_root/dags}"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
unset _genre_root
