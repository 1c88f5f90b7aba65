# Quick start:  make run   (set up + run the genre_training DAG through Airflow on MovieLens-100k)
#               make test  (set up + run the test suite)
# Without Airflow: make repro (the same stages through `dvc repro`).
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
ENV := source scripts/env.sh && export PATH="$(CURDIR)/$(BIN):$$PATH" &&

.PHONY: setup run repro test test-fast integration bench clean airflow-init airflow-train airflow airflow-ui airflow-stop airflow-screenshot
CONF ?= {}

setup:
	@bash scripts/setup.sh

run: setup
	$(ENV) bash scripts/airflow.sh run-training '$(CONF)'
	$(ENV) genre report

repro: setup
	$(ENV) genre tracking-init
	$(ENV) dvc repro
	$(ENV) genre report

# pytest-xdist workers; --dist loadfile keeps a file's tests (and its module fixtures) on one worker
PYTEST_WORKERS ?= 2

test: setup
	bash scripts/system-deps.sh
	$(ENV) pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=25

test-fast: setup  ## unit tier only: the edit-test loop (no slow or end-to-end tests)
	$(ENV) pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow and not e2e"

# The production topology without Docker (issue 11): Postgres + Redis (Debian packages), an MLflow
# server, Airflow CeleryExecutor with two workers in empty folders; ~30 min on 2 busy cores, so
# not part of `make test` (pytest -m integration runs the same thing through a test).
integration: setup
	bash scripts/system-deps.sh postgresql redis-server
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -r docker/requirements-stack.txt
	$(ENV) python scripts/integration.py $(INTEGRATION_ARGS)

bench: setup
	for b in benchmarks/bench_*.py; do $(ENV) python $$b || exit 1; done

clean:
	rm -rf data metrics plots .cache mlflow.db mlartifacts

# Airflow (local: SQLite metadata, LocalExecutor, AIRFLOW_HOME=./airflow_home, UI on 127.0.0.1)
airflow-init: setup
	$(ENV) bash scripts/airflow.sh init

airflow-train: setup
	$(ENV) bash scripts/airflow.sh run-training '$(CONF)'

airflow airflow-ui: setup
	$(ENV) bash scripts/airflow.sh start

airflow-stop:
	bash scripts/airflow.sh stop

airflow-screenshot: setup
	$(ENV) bash scripts/airflow.sh screenshot
