"""The MLflow tracking server and the DVC remote as Airflow Connections (genre_mlflow,
genre_dvc_remote), the environment as the fallback: genre_airflow.connections.resolve through the
real Task SDK look-up (``AIRFLOW_CONN_<ID>`` in JSON or URI form), no scheduler, no DB."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from genre_airflow import connections as C

ROOT = Path(__file__).resolve().parents[1]

MLFLOW_JSON = json.dumps({"conn_type": "http", "host": "mlflow.example", "port": 5000, "schema": "https",
                          "login": "bob", "password": "s3cr3t", "extra": {"experiment": "ops"}})


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow_home"))  # never ~/airflow
    for name in ("AIRFLOW_CONN_GENRE_MLFLOW", "AIRFLOW_CONN_GENRE_DVC_REMOTE",
                 *C.TARGETS["mlflow"][2], *C.TARGETS["dvc_remote"][2]):
        monkeypatch.delenv(name, raising=False)


def test_mlflow_connection_in_json_form_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/env-fallback.db")
    monkeypatch.setenv("AIRFLOW_CONN_GENRE_MLFLOW", MLFLOW_JSON)
    r = C.resolve()
    assert r.env == {"MLFLOW_TRACKING_URI": "https://mlflow.example:5000", "MLFLOW_TRACKING_USERNAME": "bob",
                     "MLFLOW_TRACKING_PASSWORD": "s3cr3t", "MLFLOW_EXPERIMENT_NAME": "ops"}
    assert r.effective["mlflow"] == {"source": "connection genre_mlflow",
                                     "MLFLOW_TRACKING_URI": "https://mlflow.example:5000",
                                     "MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "***",
                                     "MLFLOW_EXPERIMENT_NAME": "ops"}
    assert "s3cr3t" not in json.dumps(r.effective)
    assert r.effective["dvc_remote"] == {"source": "default"}  # neither a connection nor the env


def test_mlflow_connection_in_uri_form(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_GENRE_MLFLOW", "http://alice:pw%40x@tracking.local:5001")
    r = C.resolve()
    assert r.env["MLFLOW_TRACKING_URI"] == "http://tracking.local:5001"
    assert (r.env["MLFLOW_TRACKING_USERNAME"], r.env["MLFLOW_TRACKING_PASSWORD"]) == ("alice", "pw@x")


def test_without_connections_the_environment_is_the_fallback(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:secret@env-host:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    monkeypatch.setenv("GENRE_DVC_REMOTE_URL", "s3://env-bucket/genre")
    r = C.resolve()
    assert r.env == {}  # nothing to export: the task keeps its environment
    assert r.effective == {
        "mlflow": {"source": "environment", "MLFLOW_TRACKING_URI": "http://***@env-host:5000",
                   "MLFLOW_TRACKING_PASSWORD": "***"},
        "dvc_remote": {"source": "environment", "GENRE_DVC_REMOTE_URL": "s3://env-bucket/genre"}}


def test_dvc_remote_connection_url_endpoint_and_keys(monkeypatch):
    monkeypatch.setenv("GENRE_DVC_REMOTE_URL", "/env/remote")
    monkeypatch.setenv("AIRFLOW_CONN_GENRE_DVC_REMOTE", json.dumps({
        "conn_type": "aws", "login": "AKIDEMO", "password": "wJalr-secret",
        "extra": {"url": "s3://genre-store/dvc", "endpoint_url": "http://127.0.0.1:9000",
                  "region_name": "eu-west-1"}}))
    r = C.resolve()
    assert r.env == {"GENRE_DVC_REMOTE_URL": "s3://genre-store/dvc",
                     "GENRE_DVC_REMOTE_ENDPOINT": "http://127.0.0.1:9000",
                     "AWS_ACCESS_KEY_ID": "AKIDEMO", "AWS_SECRET_ACCESS_KEY": "wJalr-secret",
                     "AWS_DEFAULT_REGION": "eu-west-1"}
    assert r.effective["dvc_remote"]["source"] == "connection genre_dvc_remote"
    assert r.effective["dvc_remote"]["AWS_SECRET_ACCESS_KEY"] == "***"
    # URL in the host, keys in the extras
    monkeypatch.setenv("AIRFLOW_CONN_GENRE_DVC_REMOTE", json.dumps({
        "conn_type": "generic", "host": "/mnt/shared/dvc-remote",
        "extra": {"aws_access_key_id": "K", "aws_secret_access_key": "S"}}))
    r = C.resolve()
    assert r.env["GENRE_DVC_REMOTE_URL"] == "/mnt/shared/dvc-remote" and r.env["AWS_SECRET_ACCESS_KEY"] == "S"


def test_a_connection_without_a_target_is_refused(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_GENRE_MLFLOW", json.dumps({"conn_type": "http", "login": "x"}))
    with pytest.raises(ValueError, match="genre_mlflow: no host"):
        C.resolve()


def test_stage_environment_exports_the_connection_before_extra_env(monkeypatch, tmp_path):
    """What the tasks run under: the connection is in os.environ while the stage runs (also for
    extra_env computed from it, e.g. workspace.tracking_env), and the old values come back."""
    sys.path.insert(0, str(ROOT / "dags"))
    import _common

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/env-fallback.db")
    monkeypatch.setenv("AIRFLOW_CONN_GENRE_MLFLOW", MLFLOW_JSON)
    with _common.stage_environment(tmp_path, None,
                                   lambda: {"SEEN_URI": os.environ["MLFLOW_TRACKING_URI"]}) as resolved:
        assert os.environ["MLFLOW_TRACKING_URI"] == "https://mlflow.example:5000"
        assert os.environ["SEEN_URI"] == "https://mlflow.example:5000"
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == "bob"
        assert resolved.effective["mlflow"]["source"] == "connection genre_mlflow"
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////tmp/env-fallback.db"
    assert "SEEN_URI" not in os.environ and "MLFLOW_TRACKING_USERNAME" not in os.environ
    monkeypatch.delenv("AIRFLOW_CONN_GENRE_MLFLOW")
    with _common.stage_environment(tmp_path, None) as resolved:
        assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////tmp/env-fallback.db"
        assert resolved.effective["mlflow"]["source"] == "environment"
