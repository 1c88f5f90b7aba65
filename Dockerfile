# syntax=docker/dockerfile:1
# The genre-mlops image of the compose stack: Airflow 3.3 (Celery, Postgres), MLflow 3.17 (basic
# auth, S3 artifacts), DVC (S3 remote) and the project, on the pinned CPU-only set of
# scripts/setup.sh + constraints.txt, run as a non-root user. One image for every Python service
# of docker-compose.yml; the service's `command` picks the role.
#
#   docker build -t genre-mlops:latest .        (or: docker compose build)
FROM python:3.11.7-slim-bookworm

# DL3064 is a false positive: it matches "TOKEN" in TOKENIZERS_PARALLELISM; nothing secret here
# hadolint ignore=DL3064
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    DVC_NO_ANALYTICS=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    TOKENIZERS_PARALLELISM=false \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false \
    OMP_WAIT_POLICY=PASSIVE \
    AIRFLOW_HOME=/opt/airflow \
    GENRE_TEMPLATE_ROOT=/opt/genre \
    GENRE_PROJECT_ROOT=/srv/genre

# curl: healthchecks; tini: PID 1 that forwards signals (Celery warm shutdown) and reaps;
# libpq5: psycopg2's runtime. Debian's security updates replace exact versions, so they are
# not pinned (the base image tag is).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl tini libpq5 \
    && rm -rf /var/lib/apt/lists/*

# non-root user genre (uid/gid 50000); the mount points of the named volumes are created here, owned by it, so a
# fresh volume inherits that ownership
RUN groupadd --gid 50000 genre \
    && useradd --uid 50000 --gid genre --create-home --shell /bin/bash genre \
    && mkdir -p /opt/genre /opt/airflow/auth /opt/airflow/logs /srv/genre \
    && chown -R genre:genre /opt/genre /opt/airflow /srv/genre

WORKDIR /opt/genre

# 1. torch first and alone, the CPU build (any other torch, or an unpinned one pulled by another
#    package, is a multi-GB CUDA build); as scripts/setup.sh does
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==2.13.0"

# 2. the pinned set (constraints.txt is the full freeze of the local set) + the stack's extras;
#    recbole without its dependencies (only its MovieLens-100k files are used), as setup.sh does
COPY constraints.txt ./
COPY docker/requirements-stack.txt docker/
RUN grep -vE '^(torch|recbole)==' constraints.txt > /tmp/requirements-local.txt \
    && pip install -c constraints.txt -r /tmp/requirements-local.txt -r docker/requirements-stack.txt \
    && pip install --no-deps -c constraints.txt recbole \
    && rm /tmp/requirements-local.txt

# 3. the project itself (its dependencies are all in place: --no-deps keeps the pins above)
COPY --chown=genre:genre pyproject.toml README.md params.yaml dvc.yaml .dvcignore ./
COPY --chown=genre:genre .dvc/config .dvc/config
COPY --chown=genre:genre genre_tasks genre_tasks
COPY --chown=genre:genre genre_airflow genre_airflow
COPY --chown=genre:genre dags dags
COPY --chown=genre:genre configs configs
COPY --chown=genre:genre docker docker
# airflow_local_settings in $AIRFLOW_HOME/config: the scheduler and the Celery workers import
# MLflow, GX and torch once, before forking task processes (genre_airflow/local_settings.py)
RUN pip install --no-deps . \
    && python -c "import genre_tasks, genre_airflow.triggers, airflow.providers.celery, mlflow.server.auth, dvc_s3, psycopg2" \
    && python -m genre_airflow.local_settings install /opt/airflow

USER 50000:50000
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["airflow", "version"]
