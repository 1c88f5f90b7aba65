"""Helpers shared by the DAG files: project root, trigger-form params -> params.yaml overrides,
small XCom summaries.

The DAG processor imports this module every time it parses a DAG file, so nothing heavy may be
imported here: the standard library and the ground-floor modules ``genre_tasks.config`` (PyYAML)
and ``genre_tasks.schema`` only (tests/test_dag_integrity.py checks what parsing loads).
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from genre_tasks import config, schema

#: Project root holding params.yaml, data/, mlflow.db. In production (Celery/K8s workers) set it
#: to the shared checkout; the default is the parent of the dags folder (local use).
ROOT_ENV = config.ROOT_ENV
#: The MLflow run of a DAG run; genre_tasks.registry.tracking resumes it (promote stage).
RUN_ID_ENV = config.RUN_ID_ENV
#: Who forces a promotion and why (read by genre_tasks.registry.promote; reason required).
ACTOR_ENV = config.ACTOR_ENV
REASON_ENV = config.REASON_ENV
#: One-slot pool the promote tasks run in: registrations are serialised across workers.
REGISTRY_POOL = "genre_registry"
#: Cron expression/preset of the training DAG; "none" = asset-triggered (and manual) only.
SCHEDULE_ENV = "GENRE_TRAINING_SCHEDULE"
DEFAULT_SCHEDULE = "@weekly"
#: the feedback landing folder when params.yaml has no feedback.incoming
DEFAULT_INCOMING = "data/feedback/incoming"

#: Airflow Variable (JSON object) with params.yaml overrides for every run of the training DAG
#: (scheduled, asset-triggered, manual): edited in the UI, read by snapshot_params at run time
PARAMS_VARIABLE = "genre_params_override"

#: Celery queue of the tasks that use the project folder itself, i.e. the feedback store (landing
#: folder, store parts, the project's dvc.lock): every feedback task, and the training tasks
#: that seed a run from the store and publish a finished run into the project. With several
#: workers that share no disk, one worker serves this queue and holds the store; the stage
#: tasks go anywhere (their data travels through the DVC remote). Unset: Airflow's default queue.
STORE_QUEUE_ENV = "GENRE_STORE_QUEUE"

#: Values the trigger form offers (the lists of genre_tasks.schema)
ADAPTERS = schema.ADAPTERS
SPLIT_MODES = schema.SPLIT_MODES
STRATEGIES = schema.STRATEGIES

#: trigger-form param -> path of the params.yaml key it overrides (None = not a params.yaml key)
PARAM_KEYS: dict[str, tuple[str, ...]] = {
    "adapter": ("ingest", "adapter"),
    "max_users": ("ingest", "max_users"),
    "split_mode": ("preprocess", "split", "mode"),
    "strategies": ("train", "strategies"),
    "epochs": ("train", "epochs"),
    "train_mode": ("train", "mode"),
    "force_promote": ("promote", "force"),
}
#: Largest XCom a stage task returns (JSON bytes); bigger values are dropped from the summary.
XCOM_VALUE_MAX = 512
XCOM_TOTAL_MAX = 4096


def project_root() -> Path:
    """$GENRE_PROJECT_ROOT, else the parent of the dags folder; always absolute."""
    env = os.environ.get(ROOT_ENV, "").strip()
    root = Path(env).expanduser() if env else Path(__file__).resolve().parent.parent
    return root.resolve()


def landing_folder(root: Path | None = None) -> Path:
    """The feedback landing folder (``feedback.incoming`` of params.yaml + $GENRE_PARAMS_OVERRIDE,
    default ``data/feedback/incoming``), absolute. Read at parse time: files only, no DB."""
    root = root or project_root()
    try:
        params = config.load_params(root / config.DEFAULT_PARAMS)
        incoming = (params.get("feedback") or {}).get("incoming") or DEFAULT_INCOMING
    except (OSError, ValueError):  # a broken params.yaml fails the tasks, not the parse
        incoming = DEFAULT_INCOMING
    path = Path(incoming).expanduser()
    return path if path.is_absolute() else root / path


def store_queue() -> dict[str, str]:
    """``{"queue": $GENRE_STORE_QUEUE}`` for the store's tasks, or ``{}`` (the default queue)."""
    queue = os.environ.get(STORE_QUEUE_ENV, "").strip()
    return {"queue": queue} if queue else {}


def schedule_expression() -> str | None:
    """Cron expression/preset from $GENRE_TRAINING_SCHEDULE (default @weekly); None = no timer."""
    value = os.environ.get(SCHEDULE_ENV, "").strip() or DEFAULT_SCHEDULE
    return None if value.lower() in ("none", "null", "off", "manual") else value


def _nest(path: tuple[str, ...], value: Any) -> dict:
    out: Any = value
    for key in reversed(path):
        out = {key: out}
    return out


def overrides_from_params(params: Mapping[str, Any]) -> dict:
    """Nested params.yaml overrides from the trigger-form params.

    ``None`` (or an empty list) means "keep the value of params.yaml (+ $GENRE_PARAMS_OVERRIDE)";
    ``force_promote`` is applied only when true. The free-form ``overrides`` object goes first,
    so the typed fields win over it.
    """
    out: dict = {}
    extra = params.get("overrides")
    if isinstance(extra, Mapping):
        out = config.deep_merge(out, dict(extra))
    for name, path in PARAM_KEYS.items():
        value = params.get(name)
        if value is None or value == [] or (name == "force_promote" and not value):
            continue
        if name == "strategies":
            value = list(value)
        out = config.deep_merge(out, _nest(path, value))
    return out


def retrain_overrides(run_type: Any, overrides: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
    """A run started by new feedback (asset-triggered) is a feedback retrain: ``train.mode`` =
    ``train.retrain_mode`` (warm by default: from the champion's weights), unless the run's own
    overrides (the Airflow Variable) set ``train.mode``. {} for scheduled and manual runs."""
    if str(getattr(run_type, "value", run_type)) != "asset_triggered":
        return {}
    if "mode" in (overrides.get("train") or {}):
        return {}
    return {"train": {"mode": (params.get("train") or {}).get("retrain_mode", "warm")}}


def check_force_reason(params: Mapping[str, Any]) -> None:
    """A forced promotion from the trigger form needs a reason (recorded on the model version with
    the triggering user); refused before any stage runs."""
    if params.get("force_promote") and not str(params.get("force_reason") or "").strip():
        raise config.ParamsError("force_promote needs force_reason: say why, it is recorded on the version")


def variable_overrides(name: str = PARAMS_VARIABLE) -> dict:
    """The JSON object of Airflow Variable ``name`` ({} when unset). Call it inside a task only
    (a Variable is a metadata-DB look-up). Anything but a JSON object is refused."""
    from airflow.sdk import Variable

    value = Variable.get(name, default=None)
    if value in (None, ""):
        return {}
    try:
        doc = json.loads(value) if isinstance(value, str) else value
    except ValueError as exc:
        raise config.ParamsError(f"Airflow Variable {name}: not JSON ({exc})") from exc
    if not isinstance(doc, Mapping):
        raise config.ParamsError(f"Airflow Variable {name}: must be a JSON object of params.yaml "
                                 f"overrides, got {type(doc).__name__}")
    return dict(doc)


def small_summary(summary: Any, value_max: int = XCOM_VALUE_MAX, total_max: int = XCOM_TOTAL_MAX) -> Any:
    """What a stage task pushes to XCom: the stage summary without its big fields.

    Top-level values whose JSON is longer than ``value_max`` bytes are replaced by a note
    (their names are listed under ``_dropped``); the result stays under ``total_max`` bytes.
    """
    if not isinstance(summary, Mapping):
        text = json.dumps(summary, default=str)
        return summary if len(text) <= total_max else {"_dropped": ["<value>"], "_bytes": len(text)}
    out: dict[str, Any] = {}
    dropped: list[str] = []
    used = 2
    for key, value in summary.items():
        try:
            text = json.dumps(value, default=str)
            value = json.loads(text)  # JSON-safe copy (numpy scalars, paths -> str)
        except (TypeError, ValueError):
            dropped.append(str(key))
            continue
        size = len(text) + len(str(key)) + 6
        if len(text) > value_max or used + size > total_max - 200:
            dropped.append(str(key))
            continue
        out[str(key)] = value
        used += size
    if dropped:
        out["_dropped"] = dropped[:20]
    return out


def connection_settings():
    """The MLflow / DVC-remote settings of this task: the Airflow connections ``genre_mlflow`` and
    ``genre_dvc_remote`` when defined, else the environment (``genre_airflow.connections``).
    A connection look-up: call it inside a task only, never at parse time."""
    from genre_airflow import connections

    return connections.resolve()


@contextlib.contextmanager
def stage_environment(root: Path, mlflow_run_id: str | None,
                      extra_env: Callable[[], Mapping[str, str]] | None = None,
                      ) -> Iterator[Any]:
    """Run a stage in ``root`` with the DAG run's MLflow run id in the environment.

    The cwd is set to the project root so nothing relative lands in the worker's cwd (and
    $GENRE_PARAMS_OVERRIDE paths resolve against the project); both are restored afterwards.
    The Airflow connections ``genre_mlflow`` / ``genre_dvc_remote`` (when defined) are exported
    first, so they win over the worker's environment; ``extra_env`` is a callable evaluated after
    that (e.g. ``lambda: W.tracking_env(root)``, which reads MLFLOW_TRACKING_URI: evaluated before,
    it would miss the connection). Yields the
    resolved connection settings (``.effective``: secrets masked).
    """
    resolved = connection_settings()
    env = {ROOT_ENV: str(root), **resolved.env}
    if mlflow_run_id:
        env[RUN_ID_ENV] = mlflow_run_id
    saved = {k: os.environ.get(k) for k in env}
    cwd = os.getcwd()
    os.environ.update(env)
    try:
        more = dict(extra_env() if extra_env is not None else {})
        saved.update({k: os.environ.get(k) for k in more if k not in saved})
        os.environ.update(more)
        os.chdir(root)
        yield resolved
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
