"""Where MLflow runs go: the tracking store, its URIs and the client bound to it.

Environment variables, each with a working local default (no server needed):

``MLFLOW_TRACKING_URI``       default ``sqlite:///<root>/mlflow.db`` (the model registry too)
``MLFLOW_EXPERIMENT_NAME``    default ``genre-mlops``
``GENRE_MLFLOW_ARTIFACTS``    artifact root for a *new* experiment; default ``<root>/mlartifacts``
                              for the default URI, ``<dir of the db>/mlartifacts`` for any other
                              ``sqlite:///`` URI, and the server's choice for ``http(s)://``
``GENRE_MLFLOW_RUN_ID``       the pipeline run to resume (the Airflow DAG creates one run per
                              DAG run and passes its id to every task); unset = a new run

The sqlite store is created once, explicitly (:func:`init_store`, ``genre tracking-init``);
every other use goes through :func:`require_store` (:func:`client`, :func:`set_uris`,
:func:`configure`), which refuses a missing or half-made one.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from genre_tasks import config
from genre_tasks import schema as S

DEFAULT_EXPERIMENT = "genre-mlops"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
ARTIFACTS_ENV = "GENRE_MLFLOW_ARTIFACTS"
RUN_ID_ENV = config.RUN_ID_ENV


# --- where ----------------------------------------------------------------------------------
def tracking_uri(paths: S.Paths) -> str:
    """$MLFLOW_TRACKING_URI, else the embedded sqlite database ``<root>/mlflow.db``."""
    uri = os.environ.get(TRACKING_URI_ENV, "").strip()
    return uri or f"sqlite:///{(paths.root / 'mlflow.db').resolve()}"


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV, "").strip() or DEFAULT_EXPERIMENT


def artifact_location(paths: S.Paths, uri: str | None = None) -> str | None:
    """Artifact root given to a newly created experiment (None = the tracking server decides)."""
    explicit = os.environ.get(ARTIFACTS_ENV, "").strip()
    if explicit:
        return explicit if "://" in explicit else Path(explicit).resolve().as_uri()
    uri = uri or tracking_uri(paths)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def registry_uri(paths: S.Paths) -> str:
    """$MLFLOW_REGISTRY_URI, else the tracking URI (MLflow's own default)."""
    return os.environ.get("MLFLOW_REGISTRY_URI", "").strip() or tracking_uri(paths)


# --- the store: created once, explicitly ----------------------------------------------------------
INIT_COMMAND = "genre tracking-init"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other URI)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _schema_state(db: Path) -> str:
    """``ok`` | ``empty`` | ``half-made: ...`` for an existing sqlite file, read with sqlite3
    only (MLflow would try to create or migrate whatever it finds)."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
            if not tables:
                return "empty"
            if "alembic_version" not in tables:
                return f"half-made: {len(tables)} tables but no schema version"
            rows = con.execute("select version_num from alembic_version").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        return f"half-made: not a readable database ({exc})"
    if len(rows) != 1:
        return f"half-made: {len(rows)} schema versions recorded"
    head = _head_revision()
    if head is None:  # pragma: no cover - a later MLflow: MLflow itself will say
        return "ok"
    return "ok" if rows[0][0] == head else f"out of date: schema {rows[0][0]}, MLflow expects {head}"


@functools.cache
def _head_revision() -> str | None:
    """The schema revision the installed MLflow expects (no public API says it). MLflow reads it
    from its alembic scripts, ~45 ms a call: asked once per process (it was asked on every
    client, 122 times in one promote: 5.5 of its 17 s)."""
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision
    except ImportError:  # pragma: no cover
        return None
    return _get_latest_schema_revision()


#: (sqlite file, inode) found usable by this process: a file replaced by ``genre tracking-init``
#: (a new inode) is checked again
_VERIFIED: set[tuple[str, int]] = set()


def require_store(paths: S.Paths) -> None:
    """Refuse (StageError) to use a sqlite tracking store that was not initialised by
    :func:`init_store`: a missing file would be created lazily by whichever stage comes first
    (and a kill in that window leaves a half-made schema), a half-made one fails with SQL errors.
    Other URIs (a server, Postgres) are managed by whoever runs them."""
    from genre_tasks.errors import StageError

    db = sqlite_file(tracking_uri(paths))
    if db is None:
        return
    if not db.exists():
        raise StageError(f"MLflow tracking store {db} does not exist: create it once with "
                         f"`{INIT_COMMAND}` (make setup, make run and the training DAG's first task do)")
    key = (str(db), db.stat().st_ino)
    if key in _VERIFIED:  # checked in this process (a promote asks ~120 times)
        return
    state = _schema_state(db)
    if state == "ok":
        _VERIFIED.add(key)
    else:
        raise StageError(f"MLflow tracking store {db} is not usable ({state}). Recover with "
                         f"`{INIT_COMMAND}` (migrates an old schema on a copy; a half-made or empty "
                         f"file is moved aside to {db.name}.broken-<time> and a new store is created)")


def init_store(paths: S.Paths) -> str:
    """Create or upgrade the tracking store atomically; return a one-line account.

    sqlite: under a file lock, a missing (or empty/half-made: moved aside) database is built in
    a temporary file beside it and renamed into place, and an out-of-date one is migrated on a
    copy that then replaces it, so a kill at any moment leaves either the old file or a complete
    new one. Other URIs: MLflow's own initialisation (transactional on Postgres).
    """
    import time

    import mlflow
    from filelock import FileLock

    uri = tracking_uri(paths)
    db = sqlite_file(uri)
    if db is None:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
        return f"tracking store {uri}: ready"
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".init.lock", timeout=600):
        for stale in db.parent.glob(f".{db.name}.init-*"):
            stale.unlink(missing_ok=True)  # left by a killed init
        state = _schema_state(db) if db.exists() else "missing"
        if state == "ok":
            return f"tracking store {db}: ready"
        tmp = db.parent / f".{db.name}.init-{os.getpid()}"
        moved = ""
        if state.startswith("out of date"):
            import shutil

            shutil.copy2(db, tmp)
        elif state != "missing":
            moved = f"{db.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}"
        # MLflow creates every table and stamps the head revision on first use of an empty file
        mlflow.MlflowClient(f"sqlite:///{tmp}").search_experiments(max_results=1)
        if moved:
            os.replace(db, db.parent / moved)
        os.replace(tmp, db)
    what = {"missing": "created", "empty": "created"}.get(state, "migrated" if not moved else "re-created")
    return f"tracking store {db}: {what}" + (f" (the unusable file was moved to {moved})" if moved else "")


def set_uris(paths: S.Paths) -> str:
    """Point mlflow (fluent API) at :func:`tracking_uri` (no writes); return it.

    The registry follows the tracking URI unless $MLFLOW_REGISTRY_URI says otherwise; it is not
    set globally (mlflow.set_registry_uri would also export it to os.environ for the process).
    """
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in task logs
    require_store(paths)
    uri = tracking_uri(paths)
    mlflow.set_tracking_uri(uri)
    return uri


def configure(paths: S.Paths) -> str:
    """Point mlflow (tracking + registry) at :func:`tracking_uri`; return the experiment id.

    Creates the experiment (with :func:`artifact_location`) if needed and restores it if it was
    deleted. Safe to call repeatedly and from concurrent processes.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = set_uris(paths)
    client = mlflow.MlflowClient(uri, registry_uri=registry_uri(paths))
    name = experiment_name()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name, artifact_location=artifact_location(paths, uri))
        except MlflowException:  # created concurrently by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp_id)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def client(paths: S.Paths):
    """An MlflowClient bound to :func:`tracking_uri` (tracking and registry)."""
    import mlflow

    require_store(paths)
    return mlflow.MlflowClient(tracking_uri(paths), registry_uri=registry_uri(paths))
