# Quick start:  make run   (set up + run the pipeline on MovieLens-100k)
#               make test  (set up + run the test suite)
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
ENV := source scripts/env.sh && export PATH="$(CURDIR)/$(BIN):$$PATH" &&

.PHONY: setup run test bench clean

setup:
	@bash scripts/setup.sh

run: setup
	$(ENV) dvc repro
	$(ENV) genre report

test: setup
	$(ENV) pytest -q

bench: setup
	$(ENV) python benchmarks/bench_stages.py

clean:
	rm -rf data metrics plots .cache mlflow.db mlartifacts
