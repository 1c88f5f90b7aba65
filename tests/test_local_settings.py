"""genre_airflow.local_settings: which Airflow processes preload the tasks' libraries, and the
``airflow_local_settings`` shim Airflow imports from ``$AIRFLOW_HOME/config``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from genre_airflow import local_settings as L

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv, executor, expected", [
    (["airflow", "scheduler"], "LocalExecutor", True),
    (["airflow", "scheduler", "--skip-serve-logs"], "LocalExecutor", True),
    (["airflow", "celery", "worker", "--queues", "a"], "CeleryExecutor", True),
    (["airflow", "scheduler"], "CeleryExecutor", False),   # the Celery workers fork the tasks
    (["airflow", "api-server"], "LocalExecutor", False),
    (["airflow", "dag-processor"], "LocalExecutor", False),  # parsing stays light
    (["airflow", "triggerer"], "LocalExecutor", False),
    (["airflow", "standalone"], "LocalExecutor", False),   # its scheduler is a child process
    (["airflow", "dags", "test", "genre_training"], "LocalExecutor", False),
    (["pytest"], "LocalExecutor", False),
])
def test_only_the_processes_that_fork_tasks_preload(argv, executor, expected):
    assert L.forks_tasks(argv, executor) is expected


def test_modules_from_the_environment():
    assert L.modules({}) == L.DEFAULT_MODULES
    assert L.modules({L.ENV: "auto"}) == L.DEFAULT_MODULES
    assert L.modules({L.ENV: "0"}) == () and L.modules({L.ENV: "off"}) == ()
    assert L.modules({L.ENV: "json, csv"}) == ("json", "csv")
    assert "mlflow" in L.DEFAULT_MODULES


def test_preload_imports_in_a_forking_process_and_survives_a_missing_module():
    code = ("import sys; from genre_airflow import local_settings as L; "
            "done = L.preload(['airflow', 'celery', 'worker'], "
            "{'GENRE_AIRFLOW_PRELOAD': 'colorsys,genre_no_such_module,"
            "genre_tasks.registry.tracking_store:_head_revision'}, 'CeleryExecutor'); "
            "from genre_tasks.registry import tracking_store as T; "
            "print(done, 'colorsys' in sys.modules, T._head_revision.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert out.strip() == "['colorsys', 'genre_tasks.registry.tracking_store:_head_revision'] True 1"
    assert L.preload(["airflow", "api-server"], {L.ENV: "colorsys"}, "LocalExecutor") == []


def test_every_default_preload_imports():
    """A misspelt or moved module would only be logged by the preload and cost every task its
    import again: the whole default list must load (and its functions run)."""
    code = ("from genre_airflow import local_settings as L; "
            "print(L.preload(['airflow', 'scheduler'], {}, 'LocalExecutor') == list(L.DEFAULT_MODULES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert out.strip().splitlines()[-1] == "True"


def test_the_shim_airflow_imports_preloads_in_the_scheduler(tmp_path):
    home = tmp_path / "airflow"
    path = Path(L.install(home))
    assert path == home / "config" / "airflow_local_settings.py"
    assert L.install(home) == str(path) and path.read_text() == L.SHIM  # idempotent
    # Airflow imports the module by name from $AIRFLOW_HOME/config; exported names would become
    # airflow.settings attributes, so the shim exports none
    code = ("import sys; sys.argv = ['airflow', 'scheduler']; sys.path.insert(0, sys.argv_dir); "
            "import airflow_local_settings as s; print(s.__all__, 'colorsys' in sys.modules)")
    env = {**os.environ, L.ENV: "colorsys", "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code.replace("sys.argv_dir", repr(str(path.parent)))],
                         capture_output=True, text=True, check=True, env=env, cwd=tmp_path).stdout
    assert out.strip() == "[] True"


def test_a_foreign_local_settings_file_is_left_alone(tmp_path):
    path = tmp_path / "config" / "airflow_local_settings.py"
    path.parent.mkdir()
    path.write_text("POLICY = 1\n")
    L.install(tmp_path)
    assert path.read_text() == "POLICY = 1\n"


def test_airflow_sh_installs_the_shim(tmp_path):
    home = tmp_path / "home"
    subprocess.run(["bash", "-c", f'GENRE_AIRFLOW_HOME={home} source scripts/airflow.sh'], cwd=ROOT,
                   check=True, env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert (home / "config" / "airflow_local_settings.py").read_text() == L.SHIM
