"""Airflow local settings of genre-mlops: heavy libraries imported once in the processes that
fork the task processes, so a task starts with them already loaded.

An Airflow 3 task runs in a process forked from its executor's worker (LocalExecutor: a worker
forked from the scheduler; Celery: a pool process forked from ``airflow celery worker``).
Every stage task then imported MLflow (~1.9 s here) and DVC, a feedback validation Great
Expectations (~4 s), the prequential scoring torch (~2 s): on the feedback -> retrain path (~17 tasks) that
was a third of the batch-to-decision time. Imported here, before the fork, they cost nothing
per task (copy-on-write pages; the LocalExecutor freezes the GC before forking its workers) --
the same idea as gunicorn's ``--preload`` or Celery's prefork pool.

Airflow imports ``airflow_local_settings`` from ``$AIRFLOW_HOME/config`` in every process it
starts; ``scripts/airflow.sh`` (and the Docker image) put a two-line shim there that calls
:func:`preload`. Only the forking processes preload (``airflow scheduler`` with the
LocalExecutor, ``airflow celery worker``); the API server, DAG processor and triggerer stay
light (parsing must never load these). ``$GENRE_AIRFLOW_PRELOAD``: ``0``/``off`` disables it,
a comma-separated list replaces the default one (``module`` imports it, ``module:function``
also calls the function, e.g. to fill a cache the forked tasks inherit).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

#: What the tasks import themselves, the stages they run in-process included (with
#: ``GENRE_STAGE_INPROCESS=0`` the ``genre <stage>`` processes DVC starts exec a fresh interpreter
#: and gain nothing from a preload).
DEFAULT_MODULES: tuple[str, ...] = (
    "mlflow",                             # every stage task: run lock + stage logging
    "great_expectations",                 # feedback validate_batch
    "torch",                              # prequential: the champion's pyfunc model
    # the stages now run in the task process (genre_tasks/registry/repro.py): what their first
    # call imports is paid by every task otherwise. torch.use_deterministic_algorithms (train)
    # imports torch._inductor (~2.4 s); the train / evaluate plots import pyplot (~0.5 s)
    "torch._inductor.config",
    "matplotlib.pyplot",
    "genre_tasks.models.train",
    "genre_tasks.evaluation.evaluate",
    "genre_tasks.registry.promote",
    # every pyfunc load (prequential, the warm start, promote's champion) checks the model's pip
    # requirements against the installed packages; MLflow maps modules to packages by reading
    # every installed distribution's metadata, once per process: ~2.2 s
    "mlflow.utils.requirements_utils:_init_modules_to_packages_map",
    "dvc.repo",                           # stage tasks: dvc push through DVC's API
    "dvc.repo.push",
    "genre_tasks.registry.tracking",
    # MLflow parses its alembic migration scripts (importing each) to learn the schema head: ~0.9 s
    # at the first tracking-store use of every process; done here, a task's costs ~40 ms
    "genre_tasks.registry.tracking_store:_head_revision",
    # MLflow's SQLAlchemy stores (tracking, registry) are imported at the first client of a
    # process, and SQLAlchemy configures their ~70 mappers at the first query: ~0.3 s in every
    # task (each one opens a client), done here once
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "sqlalchemy.orm:configure_mappers",
    "genre_tasks.registry.workspace",
    "genre_tasks.registry.stage_logging",
    "genre_tasks.feedback",
)
ENV = "GENRE_AIRFLOW_PRELOAD"
_OFF = ("0", "off", "false", "no", "none")

__all__: list[str] = []  # Airflow copies public names of this module into airflow.settings


def forks_tasks(argv: Sequence[str], executor: str) -> bool:
    """True for the Airflow processes whose forks run tasks: ``airflow scheduler`` with a
    LocalExecutor, ``airflow celery worker``."""
    args = [a for a in argv[1:] if not a.startswith("-")]
    if args[:2] == ["celery", "worker"]:
        return True
    return args[:1] == ["scheduler"] and "LocalExecutor" in executor


def modules(env: Mapping[str, str]) -> tuple[str, ...]:
    """The modules to preload: ``$GENRE_AIRFLOW_PRELOAD`` (a comma-separated list, or off), else
    :data:`DEFAULT_MODULES`."""
    value = env.get(ENV, "").strip()
    if value.lower() in _OFF:
        return ()
    if value and value.lower() not in ("1", "on", "true", "yes", "auto"):
        return tuple(m.strip() for m in value.split(",") if m.strip())
    return DEFAULT_MODULES


def preload(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
            executor: str | None = None) -> list[str]:
    """Import :func:`modules` if this process forks tasks; returns the modules imported. A module
    that fails to import is logged and skipped (the task imports it again and fails loudly)."""
    argv = sys.argv if argv is None else argv
    env = os.environ if env is None else env
    if executor is None:
        executor = env.get("AIRFLOW__CORE__EXECUTOR", "")
        if not executor:
            try:
                from airflow.configuration import conf

                executor = conf.get("core", "executor", fallback="")
            except Exception:  # noqa: BLE001 - no config: nothing forks tasks here
                executor = ""
    if not forks_tasks(argv, executor):
        return []
    done = []
    t0 = time.perf_counter()
    for name in modules(env):
        try:
            module, _, call = name.partition(":")  # "module:function" = import, then call it
            imported = importlib.import_module(module)
            if call:
                getattr(imported, call)()
            done.append(name)
        except Exception as exc:  # noqa: BLE001 - a preload must never stop the scheduler
            log.warning("genre preload: %s not imported (%s)", name, exc)
    # printed, not logged: Airflow configures logging only after importing its local settings
    print(f"genre preload ({argv[1:3]}): {', '.join(done) or 'nothing'} in "
          f"{time.perf_counter() - t0:.1f} s, before task processes are forked", file=sys.stderr)
    return done


#: ``$AIRFLOW_HOME/config/airflow_local_settings.py``: Airflow imports it in each of its processes
SHIM = '''\
"""genre-mlops: heavy libraries preloaded before Airflow forks task processes
(genre_airflow/local_settings.py; written by `python -m genre_airflow.local_settings install`)."""
__all__ = []  # nothing of this module is an Airflow setting
try:
    from genre_airflow.local_settings import preload as _preload
except ImportError:  # genre-mlops not importable in this process: nothing to preload
    pass
else:
    _preload()
'''


def install(airflow_home: str | os.PathLike) -> str:
    """Write the :data:`SHIM` as ``<airflow_home>/config/airflow_local_settings.py`` (replacing
    an older copy of it; a file that is not ours is left alone). Returns the path."""
    path = Path(airflow_home) / "config" / "airflow_local_settings.py"
    if path.exists() and "genre_airflow.local_settings" not in path.read_text(errors="replace"):
        log.warning("%s exists and is not genre-mlops' one: left as it is (no preload)", path)
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != SHIM:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(SHIM)
        tmp.replace(path)
    return str(path)


if __name__ == "__main__":  # python -m genre_airflow.local_settings install <AIRFLOW_HOME>
    if len(sys.argv) != 3 or sys.argv[1] != "install":
        sys.exit("usage: python -m genre_airflow.local_settings install <AIRFLOW_HOME>")
    print(install(sys.argv[2]))
