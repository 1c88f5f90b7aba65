"""genre-mlops task package: every pipeline stage as a plain, Airflow-free function.

Stages (one module each): ingest -> validate -> preprocess -> embed -> genre
(-> train -> evaluate -> promote). Each is called by two thin callers: the `genre`
console script (which `dvc.yaml` runs) and an Airflow task in `dags/`.
"""
from __future__ import annotations

__version__ = "0.1.0"
