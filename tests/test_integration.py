"""The production topology for real (scripts/integration.py): Debian Postgres and Redis, an MLflow
server with basic auth, Airflow 3 CeleryExecutor with two workers in empty folders. Selected
only with ``pytest -m integration`` (about 30 minutes on two busy cores); ``make integration``
runs the same script directly.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.e2e
def test_training_on_two_celery_workers_champion_pull_feedback_and_clean_shutdown(tmp_path):
    for tool in ("redis-server", "/usr/lib/postgresql/15/bin/postgres"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing: scripts/system-deps.sh postgresql redis-server")
    pytest.importorskip("airflow.providers.celery", reason="pip install -c constraints.txt -r docker/requirements-stack.txt")
    work = tmp_path / "stack"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "integration.py"), "--dir", str(work)],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600)
    print(proc.stdout[-20000:])
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    result = json.loads((work / "result.json").read_text())
    assert set(result["tasks_by_worker"]) == {"worker-a", "worker-b"}
    assert result["champion"]["tags"]["genre.artifacts_sha256"]
    assert result["dvc_pull"]["status_train"] == "up to date" and result["dvc_pull"]["files"] > 0
    assert result["retrain"]["run_type"] == "asset_triggered"
    assert result["retrain"]["decision"]["decision"]
    assert result["shutdown"] == {"sigkilled": result["shutdown"]["sigkilled"], "groups_left": {}, "ports_left": {}}
