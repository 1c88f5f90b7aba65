"""MLflow tracking for a pipeline run: where runs go, what identifies them, what they record.

Where (environment variables with a working local default, no server needed):

``MLFLOW_TRACKING_URI``       default ``sqlite:///<root>/mlflow.db`` (the model registry too)
``MLFLOW_EXPERIMENT_NAME``    default ``genre-mlops``
``GENRE_MLFLOW_ARTIFACTS``    artifact root for a *new* experiment; default ``<root>/mlartifacts``
                              for the default URI, ``<dir of the db>/mlartifacts`` for any other
                              ``sqlite:///`` URI, and the server's choice for ``http(s)://``
``GENRE_MLFLOW_RUN_ID``       the pipeline run to resume (the Airflow DAG creates one run per
                              DAG run and passes its id to every task); unset = a new run

One MLflow run per pipeline run (:func:`pipeline_run`), one nested child run per trained
strategy (:func:`log_training`). Every run is stamped with the git commit, the hash of the
params and the DVC hashes of the data it was built from (:func:`lineage_tags`), so a registered
model version can be traced back to the exact code, configuration and data.

Metric names: MLflow allows ``[/\\w.\\- :]`` only, so ``ndcg@10`` is logged as ``ndcg_at_10``
(:func:`metric_key`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from genre_tasks import config, io
from genre_tasks import schema as S

log = logging.getLogger("genre.tracking")

DEFAULT_EXPERIMENT = "genre-mlops"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
ARTIFACTS_ENV = "GENRE_MLFLOW_ARTIFACTS"
RUN_ID_ENV = config.RUN_ID_ENV

#: tag on a child run naming the strategy it records
STRATEGY_TAG = "genre.strategy"
#: tag on a hyper-parameter search trial's run (a child of its strategy's run): the trial number
TRIAL_TAG = "genre.search_trial"
PARENT_TAG = "mlflow.parentRunId"


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
    try:  # the head revision this MLflow expects (no public API says it)
        from mlflow.store.db.utils import _get_latest_schema_revision

        head = _get_latest_schema_revision()
    except ImportError:  # pragma: no cover - a later MLflow: MLflow itself will say
        return "ok"
    return "ok" if rows[0][0] == head else f"out of date: schema {rows[0][0]}, MLflow expects {head}"


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
    state = _schema_state(db)
    if state != "ok":
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


# --- what identifies a run ------------------------------------------------------------------
def git_commit(root: str | Path = ".") -> str:
    """HEAD commit of the repository holding ``root`` (``+dirty`` if tracked files changed)."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        commit = head.stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def params_hash(params: Mapping) -> str:
    """sha256 of the canonical JSON of the (merged) params.yaml."""
    return hashlib.sha256(canonical_json(params).encode("utf-8")).hexdigest()


def key_data_files(paths: S.Paths) -> list[Path]:
    """The data a model is trained and evaluated on: processed tables + item vectors."""
    files = sorted(paths.processed_dir.glob("*.parquet")) if paths.processed_dir.exists() else []
    return [*files, paths.vectors]


def _rel(paths: S.Paths, path: Path) -> str:
    try:
        return path.resolve().relative_to(paths.root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def dvc_lock_hashes(paths: S.Paths) -> dict[str, str]:
    """md5 of every data output (under data/) recorded in dvc.lock ({} without a dvc.lock)."""
    import yaml

    lock = paths.root / "dvc.lock"
    if not lock.exists():
        return {}
    try:
        doc = yaml.safe_load(lock.read_text()) or {}
    except yaml.YAMLError as exc:
        log.warning("%s: unreadable (%s); hashing data files instead", lock, exc)
        return {}
    out: dict[str, str] = {}
    for stage in (doc.get("stages") or {}).values():
        for o in stage.get("outs") or []:
            # data outputs only: metrics/ and plots/ change with timings on every run
            if isinstance(o, dict) and str(o.get("path", "")).startswith("data/") and o.get("md5"):
                out[str(o["path"])] = str(o["md5"])
    return out


def data_hashes(paths: S.Paths) -> dict[str, str]:
    """Content hashes of the data a model is trained on: ``{relative path: md5}``.

    With a train record (data/manifests/train.json): the files train read and, back through the
    stage records, what they were made from (down to the source files ingest read), with the
    hashes they had when each stage ran (:func:`genre_tasks.manifests.lineage`): what the model
    was trained on, whatever changed since (e.g. a feedback batch landing before promote).
    Without one (a run that has not trained):

    The outputs recorded in dvc.lock if there is one (DVC's own hashes, ``.dir`` for folders);
    the key data files (processed tables, item vectors) are always hashed from the bytes on
    disk too, so the record is right even when a stage ran outside ``dvc repro``.
    """
    from genre_tasks import manifests

    trained_on = manifests.lineage(paths, "train")
    if trained_on:
        return dict(sorted(trained_on.items()))
    hashes = dvc_lock_hashes(paths)
    for f in key_data_files(paths):
        if f.exists():
            hashes[_rel(paths, f)] = io.file_md5(f)
    return dict(sorted(hashes.items()))


def combined_hash(hashes: Mapping[str, str]) -> str:
    """One short fingerprint of a {path: md5} mapping."""
    return hashlib.sha256(canonical_json(dict(hashes)).encode()).hexdigest()[:16]


def split_mode(paths: S.Paths) -> str:
    for f in (paths.split_info, paths.metrics("evaluate")):
        if f.exists():
            doc = io.read_json(f)
            mode = doc.get("mode") or doc.get("split")
            if isinstance(mode, str):
                return mode
    return "unknown"


def lineage_tags(paths: S.Paths, params: Mapping | None) -> dict[str, str]:
    """Tags that tie a run / model version to code, configuration and data.

    ``git_commit``, ``params_hash``, ``data_hash`` (fingerprint of all data hashes),
    ``split_mode`` and one ``data.<relative path>`` = md5 per data output.
    """
    hashes = data_hashes(paths)
    tags = {
        "git_commit": git_commit(paths.root),
        "params_hash": params_hash(params) if params is not None else "unknown",
        "data_hash": combined_hash(hashes),
        "split_mode": split_mode(paths),
    }
    tags.update({f"data.{k}": v for k, v in hashes.items()})
    return tags


# --- names and values -------------------------------------------------------------------------
def metric_key(name: str) -> str:
    """An MLflow-safe metric/param/tag name: ``ndcg@10`` -> ``ndcg_at_10``."""
    import re

    out = name.replace("@", "_at_")
    return re.sub(r"[^/\w.\- :]", "_", out)


def flatten(obj: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": value}`` (lists are kept as values)."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            key = f"{prefix}{sep}{k}" if prefix else str(k)
            out.update(flatten(v, key, sep))
    else:
        out[prefix] = obj
    return out


def numeric(value: Any) -> float | None:
    """``value`` as a finite float, or None (bools, strings, NaN and inf are not metrics)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def param_value(value: Any) -> str:
    text = value if isinstance(value, str) else canonical_json(value)
    return text[:6000]


# --- the pipeline run ---------------------------------------------------------------------------
def _end_stale_runs() -> None:
    import mlflow

    while (active := mlflow.active_run()) is not None:
        log.warning("ending stale active MLflow run %s", active.info.run_id)
        mlflow.end_run()


def create_run(paths: S.Paths, params: Mapping | None = None, run_name: str | None = None) -> str:
    """Create (not start) the run of a pipeline run and return its id: what the Airflow DAG's
    first task does before passing the id to every task as $GENRE_MLFLOW_RUN_ID."""
    import mlflow

    exp_id = configure(paths)
    tags = lineage_tags(paths, params)
    name = run_name or f"pipeline-{tags['params_hash'][:8]}-{tags['data_hash'][:8]}"
    run_id = mlflow.MlflowClient(tracking_uri(paths)).create_run(
        exp_id, run_name=name, tags={"genre.pipeline": "1"}).info.run_id
    log.info("created MLflow run %s in experiment %s", run_id, experiment_name())
    return run_id


@contextlib.contextmanager
def pipeline_run(paths: S.Paths, params: Mapping | None = None,
                 run_name: str | None = None) -> Iterator[str]:
    """The MLflow run of this pipeline run, active (fluent API) inside the block; yields its id.

    Resumes $GENRE_MLFLOW_RUN_ID if set (the Airflow DAG run's run), else creates a run. Any
    stale active run in this process is ended first, so this never fails with "Run already
    active". The run is ended on exit (FAILED if the block raised).
    """
    import mlflow

    configure(paths)
    cl = mlflow.MlflowClient(tracking_uri(paths))
    tags = lineage_tags(paths, params)
    run_id = os.environ.get(RUN_ID_ENV, "").strip()
    active = mlflow.active_run()
    if active is not None and run_id and active.info.run_id == run_id:
        own = False  # the caller already resumed this exact run: leave it to them
    else:
        _end_stale_runs()
        own = True
        if run_id:
            cl.get_run(run_id)  # raises a clear error if the id is unknown
            log.info("resuming MLflow run %s (from $%s)", run_id, RUN_ID_ENV)
        else:
            run_id = create_run(paths, params, run_name)
        mlflow.start_run(run_id=run_id)
    try:
        set_tags(run_id, tags, paths)
        yield run_id
    except BaseException:
        if own:
            mlflow.end_run(status="FAILED")
        raise
    else:
        if own:
            mlflow.end_run()


def set_tags(run_id: str, tags: Mapping[str, Any], paths: S.Paths) -> None:
    from mlflow.entities import RunTag

    cl = client(paths)
    items = [RunTag(metric_key(k), str(v)[:5000]) for k, v in tags.items()]
    for i in range(0, len(items), 100):
        cl.log_batch(run_id, tags=items[i:i + 100])


def log_params(run_id: str, params: Mapping, paths: S.Paths) -> int:
    """params.yaml flattened (``train.dim`` = 64, lists as JSON). Returns how many were logged.

    Params are immutable in MLflow: a key already logged with another value (a resumed run
    whose params changed) is kept and a warning names it.
    """
    from mlflow.entities import Param

    cl = client(paths)
    existing = cl.get_run(run_id).data.params
    flat = {metric_key(k): param_value(v) for k, v in flatten(params).items()}
    new = [Param(k, v) for k, v in flat.items() if k not in existing]
    changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
    if changed:
        log.warning("run %s: params already logged with other values, kept: %s", run_id, changed)
    for i in range(0, len(new), 100):
        cl.log_batch(run_id, params=new[i:i + 100])
    return len(new)


def log_metrics(run_id: str, metrics: Mapping[str, Any], paths: S.Paths, prefix: str = "",
                step: int = 0) -> int:
    """Log the finite numeric values of ``metrics`` (nested dicts flattened) at ``step``."""
    import time

    from mlflow.entities import Metric

    cl = client(paths)
    now = int(time.time() * 1000)
    batch = []
    for k, v in flatten(metrics).items():
        f = numeric(v)
        if f is not None:
            batch.append(Metric(metric_key(f"{prefix}{k}"), f, now, step))
    for i in range(0, len(batch), 500):
        cl.log_batch(run_id, metrics=batch[i:i + 500])
    return len(batch)


def log_artifact(run_id: str, path: Path, paths: S.Paths, artifact_path: str | None = None) -> bool:
    if not Path(path).exists():
        return False
    cl = client(paths)
    if Path(path).is_dir():
        cl.log_artifacts(run_id, str(path), artifact_path)
    else:
        cl.log_artifact(run_id, str(path), artifact_path)
    return True


# --- what a pipeline run records ----------------------------------------------------------------
def strategy_dirs(paths: S.Paths) -> list[Path]:
    """Trained strategy folders: data/model/<strategy>/ holding a meta.json."""
    if not paths.model_dir.exists():
        return []
    return sorted(d for d in paths.model_dir.iterdir() if d.is_dir() and (d / "meta.json").exists())


def _child_run(parent_id: str, strategy: str, paths: S.Paths, trial: int | None = None) -> tuple[str, dict]:
    """The child run of ``strategy`` under ``parent_id`` (reused if it exists: idempotent); with
    ``trial``, the run of that hyper-parameter search trial (a child of the strategy's run)."""
    cl = client(paths)
    parent = cl.get_run(parent_id)
    tags = {PARENT_TAG: parent_id, STRATEGY_TAG: strategy}
    if trial is not None:
        tags[TRIAL_TAG] = str(trial)
    found = cl.search_runs([parent.info.experiment_id],
                           filter_string=" and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items()),
                           max_results=1)
    if found:
        return found[0].info.run_id, found[0].data.tags
    name = f"train-{strategy}" if trial is None else f"search-{strategy}-{trial}"
    run = cl.create_run(parent.info.experiment_id, run_name=name, tags=tags)
    return run.info.run_id, {}


def log_search(child_id: str, strategy: str, record: Mapping, paths: S.Paths) -> list[str]:
    """One child run per trial of ``strategy``'s hyper-parameter search (metrics/train.json's
    ``strategies.<strategy>.search``) under its training run: the values as params, the valid
    metric, best epoch and seconds as metrics, ``genre.search_chosen``. Idempotent."""
    cl = client(paths)
    ids = []
    for t in record.get("trials", []):
        run_id, tags = _child_run(child_id, strategy, paths, trial=int(t["trial"]))
        ids.append(run_id)
        if tags.get("genre.search_logged") == "true":
            continue
        log_params(run_id, dict(t["values"]), paths)
        log_metrics(run_id, {k: t.get(k) for k in ("valid_ndcg@10", "best_epoch", "epochs_run", "seconds")}, paths)
        set_tags(run_id, {"genre.search_chosen": str(t["trial"] == record.get("chosen")).lower(),
                          "genre.search_logged": "true"}, paths)
        cl.set_terminated(run_id)
    return ids


def log_training(run_id: str, paths: S.Paths) -> dict[str, str]:
    """One nested child run per trained strategy: its meta.json as params, curve.csv as
    per-epoch metrics (step = epoch), the curve as an artifact. Returns {strategy: child run id}.

    Idempotent: a child whose curve (same md5) was already logged is left as it is.
    """
    import pandas as pd

    cl = client(paths)
    selected = _selected_strategy(paths)
    children: dict[str, str] = {}
    record = paths.metrics("train")
    searches = {s: r["search"] for s, r in (io.read_json(record).get("strategies", {}) if record.exists() else {}).items()
                if isinstance(r, dict) and r.get("search")}
    for d in strategy_dirs(paths):
        strategy = d.name
        child_id, child_tags = _child_run(run_id, strategy, paths)
        children[strategy] = child_id
        if strategy in searches:
            log_search(child_id, strategy, searches[strategy], paths)
        curve = d / "curve.csv"
        curve_md5 = io.file_md5(curve) if curve.exists() else "none"
        if child_tags.get("genre.curve_md5") == curve_md5:
            continue
        meta = io.read_json(d / "meta.json")  # small values only: not item_ids / per-epoch history
        log_params(child_id, {"meta": {k: v for k, v in meta.items() if len(canonical_json(v)) <= 500}},
                   paths)
        if curve.exists():
            df = pd.read_csv(curve)
            step_col = "epoch" if "epoch" in df.columns else None
            for i, row in df.iterrows():
                step = int(row[step_col]) if step_col else int(i)
                log_metrics(child_id, {k: v for k, v in row.items() if k != step_col}, paths, step=step)
            cl.log_artifact(child_id, str(curve))
        set_tags(child_id, {"genre.curve_md5": curve_md5,
                            "genre.selected": str(strategy == selected).lower()}, paths)
        cl.set_terminated(child_id)
    return children


def _selected_strategy(paths: S.Paths) -> str | None:
    f = paths.model_dir / "selected.json"
    return io.read_json(f).get("strategy") if f.exists() else None


def log_evaluation(run_id: str, paths: S.Paths) -> int:
    """Final test metrics of metrics/evaluate.json, ``test.<model>.<metric>`` per model (and
    ``test.<metric>`` for the selected model). Returns how many values were logged."""
    f = paths.metrics("evaluate")
    if not f.exists():
        return 0
    doc = io.read_json(f)
    n = 0
    models = doc.get("models") or {}
    for name, metrics in models.items():
        n += log_metrics(run_id, metrics, paths, prefix=f"test.{name}.")
    selected = doc.get("selected")
    if isinstance(selected, str) and selected in models:
        n += log_metrics(run_id, models[selected], paths, prefix="test.")
    return n


def log_lineage(run_id: str, paths: S.Paths) -> list[str]:
    """Datasets as run inputs: the fit rows (context ``training``), the test rows (context
    ``test``) and the item table (``training``). Each digest starts with the md5 of its source
    file and each input is tagged with that md5 (``dvc_md5``), the combined ``data_hash`` and the
    split mode. Returns ``["name:context", ...]``."""
    import warnings

    import mlflow
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    if not paths.interactions.exists():
        return []
    hashes = data_hashes(paths)
    common = {"data_hash": combined_hash(hashes), "split_mode": split_mode(paths)}

    def as_object(df: pd.DataFrame) -> pd.DataFrame:  # pandas string dtypes have no MLflow type
        df = df.reset_index(drop=True)
        for c in df.columns:
            if str(df[c].dtype) in ("string", "str"):
                df[c] = df[c].astype(object)
        return df

    inter = pd.read_parquet(paths.interactions)
    keep = [c for c in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.RATING, S.SPLIT, S.POSITIVE) if c in inter]
    parts = [("interactions-trainvalid", "training", paths.interactions,
              inter.loc[inter[S.SPLIT].isin(["train", "valid"]), keep]),
             ("interactions-test", "test", paths.interactions, inter.loc[inter[S.SPLIT] == "test", keep])]
    if paths.items.exists():
        parts.append(("items", "training", paths.items, pd.read_parquet(paths.items, columns=[S.ITEM_ID, S.TITLE])))
    inputs, logged = [], []
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways", int-column hints
        warnings.simplefilter("ignore", UserWarning)
        for name, context, source, df in parts:
            md5 = hashes.get(_rel(paths, source), "none")
            ds = mlflow.data.from_pandas(as_object(df), source=str(source.resolve()), name=name,
                                         digest=f"{md5[:10]}-{context[:2]}")
            tags = [InputTag("mlflow.data.context", context), InputTag("dvc_md5", md5),
                    *(InputTag(k, v) for k, v in common.items())]
            inputs.append(DatasetInput(ds._to_mlflow_entity(), tags))
            logged.append(f"{name}:{context}")
    client(paths).log_inputs(run_id, datasets=inputs)
    return logged


def log_pipeline(run_id: str, paths: S.Paths, params: Mapping | None) -> dict:
    """Everything a pipeline run records: params, training curves (child runs), test metrics,
    plots/tables/metrics files as artifacts, dataset lineage. Returns a small summary."""
    summary: dict[str, Any] = {"run_id": run_id}
    if params is not None:
        summary["params"] = log_params(run_id, params, paths)
    summary["children"] = log_training(run_id, paths)
    train_metrics = paths.metrics("train")
    if train_metrics.exists():
        log_metrics(run_id, io.read_json(train_metrics), paths, prefix="train.")
    summary["test_metrics"] = log_evaluation(run_id, paths)
    artifacts = {
        paths.root / "data" / "eval" / "comparison.md": "evaluation",
        paths.root / "data" / "eval" / "comparison.png": "evaluation",
        paths.model_dir / "train_curve.png": "training",
        paths.model_dir / "selected.json": "training",
        paths.validation_summary: "validation",
        paths.split_info: "data",
    }
    if paths.metrics_dir.exists():
        artifacts.update({f: "metrics" for f in sorted(paths.metrics_dir.glob("*.json"))})
    summary["artifacts"] = sorted(_rel(paths, f) for f, where in artifacts.items()
                                  if log_artifact(run_id, f, paths, where))
    try:
        summary["inputs"] = log_lineage(run_id, paths)
    except Exception as exc:  # lineage is a record, never a reason to fail the pipeline
        log.warning("dataset lineage not logged: %s", exc)
        summary["inputs"] = []
    return summary


# --- the run record: params snapshot, dvc.lock, live stage logging (one record of what ran) -------
#: tag naming the last stage that finished in a run, and one tag per stage (computed/run-cache/...)
LAST_STAGE_TAG = "genre.last_stage"
STAGE_TAG = "genre.stage."


def download_run_file(run_id: str, artifact: str, paths: S.Paths) -> Path | None:
    """Download one artifact file of ``run_id`` into a temporary folder; None if absent."""
    import tempfile

    from mlflow.exceptions import MlflowException

    dst = Path(tempfile.mkdtemp(prefix="genre-artifact-"))
    try:
        return Path(client(paths).download_artifacts(run_id, artifact, str(dst)))
    except (MlflowException, OSError) as exc:
        log.info("run %s: no artifact %s (%s)", run_id, artifact, type(exc).__name__)
        return None


def log_params_snapshot(run_id: str, params: Mapping, snapshot: Path, paths: S.Paths) -> dict:
    """The params a run uses, once, at its start: flattened as MLflow params, the snapshot file
    as the artifact ``run/params.yaml``, its hash as the tag ``genre.params_hash``."""
    n = log_params(run_id, params, paths)
    client(paths).log_artifact(run_id, str(snapshot), "run")
    digest = params_hash(params)
    set_tags(run_id, {"genre.params_hash": digest, "params_hash": digest}, paths)
    return {"params": n, "params_hash": digest}


def log_run_lock(run_id: str, lock: Path, paths: S.Paths) -> str | None:
    """Upload a run's dvc.lock (artifact ``run/dvc.lock``) and tag its md5
    (``genre.dvc_lock_md5``): the record that restores the run's data (``genre checkout``)."""
    if not lock.exists():
        return None
    client(paths).log_artifact(run_id, str(lock), "run")
    md5 = io.file_md5(lock)
    set_tags(run_id, {"genre.dvc_lock_md5": md5}, paths)
    return md5


def _stage_artifacts(stage: str, paths: S.Paths) -> dict[Path, str]:
    root = paths.root
    return {
        "validate": {paths.validation_summary: "validation", paths.validation_dir / "docs": "validation/docs"},
        "preprocess": {paths.split_info: "data"},
        "genre": {},
        "train": {paths.model_dir / "train_curve.png": "training",
                  paths.model_dir / "selected.json": "training"},
        "evaluate": {root / "data" / "eval" / "comparison.md": "evaluation",
                     root / "data" / "eval" / "comparison.png": "evaluation"},
    }.get(stage, {})


def log_stage(run_id: str, stage: str, paths: S.Paths, how: str | None = None,
              seconds: float | None = None) -> dict:
    """Log one finished stage into the pipeline run as it goes: its metrics file's numbers
    (prefix ``<stage>.``), its artifacts (GX summary + Data Docs at validate, curves at train,
    the comparison at evaluate), per-strategy training curves as child runs at train, dataset
    lineage (``log_inputs``) at preprocess; tags ``genre.stage.<stage>`` = how it ran and
    ``genre.last_stage``. A failed or dry run therefore shows how far it got."""
    summary: dict[str, Any] = {"stage": stage}
    f = paths.metrics(stage)
    if stage == "evaluate":
        summary["metrics"] = log_evaluation(run_id, paths)  # test.<model>.<metric>
    elif f.exists():
        summary["metrics"] = log_metrics(run_id, io.read_json(f), paths,
                                         prefix=f"{stage}.")
    if seconds is not None:
        log_metrics(run_id, {f"stage_seconds.{stage}": seconds}, paths)
    summary["artifacts"] = sorted(_rel(paths, p) for p, where in _stage_artifacts(stage, paths).items()
                                  if log_artifact(run_id, p, paths, where))
    if stage == "train":
        summary["children"] = log_training(run_id, paths)
    if stage == "preprocess":
        try:
            summary["inputs"] = log_lineage(run_id, paths)
        except Exception as exc:  # lineage is a record, never a reason to fail the pipeline
            log.warning("dataset lineage not logged: %s", exc)
    set_tags(run_id, {f"{STAGE_TAG}{stage}": how or "done", LAST_STAGE_TAG: stage}, paths)
    return summary


def epoch_logger(strategy: str, paths: S.Paths, phase: str = "valid"):
    """A ``fit_model(on_epoch=...)`` callback logging each epoch live into the pipeline run
    ($GENRE_MLFLOW_RUN_ID), as ``train.<strategy>.<phase>.loss`` / ``.valid_ndcg_at_10`` with
    step = epoch; None outside a pipeline run."""
    run_id = os.environ.get(RUN_ID_ENV, "").strip()
    if not run_id:
        return None

    def on_epoch(epoch: int, loss: float, seconds: float, ndcg: float | None = None) -> None:
        try:
            values = {"loss": loss, "epoch_seconds": seconds}
            if ndcg is not None:
                values["valid_ndcg@10"] = ndcg
            log_metrics(run_id, values, paths, prefix=f"live.{strategy}.{phase}.", step=epoch)
        except Exception as exc:  # the record must never stop training
            log.warning("live metrics not logged: %s", exc)

    return on_epoch


# --------------------------------------------------------------------------------------
# the MLflow run of an orchestrated (Airflow) pipeline run
# --------------------------------------------------------------------------------------
def start_pipeline_run(paths: S.Paths, dag_id: str, run_id: str, grid_url: str,
                       run_type: str) -> tuple[str, bool]:
    """Find (a retried / cleared DAG run) or create the MLflow run of the DAG run ``run_id``.

    The run is looked up by its tags ``airflow.dag_id`` + ``airflow.run_id`` (so a retry never
    makes a second run), set back to RUNNING if it was terminated, and (re)tagged with a link to
    the Airflow grid. Returns ``(mlflow_run_id, created)``.
    """
    init_store(paths)  # created once, here: never lazily in a stage
    experiment_id = configure(paths)
    cl = client(paths)
    found = cl.search_runs(
        [experiment_id], max_results=1,
        filter_string=f"tags.`airflow.dag_id` = '{dag_id}' and tags.`airflow.run_id` = '{run_id}'")
    tags = {"airflow.dag_id": dag_id, "airflow.run_id": run_id, "airflow.grid_url": grid_url,
            "airflow.run_type": run_type, "genre.pipeline": "1",
            "mlflow.source.name": f"airflow:{dag_id}",
            "mlflow.note.content": f"Airflow DAG run [{dag_id} / {run_id}]({grid_url})"}
    if found:
        mlflow_run_id, created = found[0].info.run_id, False
        if found[0].info.status != "RUNNING":
            cl.update_run(mlflow_run_id, status="RUNNING")
    else:
        mlflow_run_id = cl.create_run(experiment_id, run_name=f"{dag_id}__{run_id}",
                                      tags=tags).info.run_id
        created = True
    set_tags(mlflow_run_id, tags, paths)
    return mlflow_run_id, created


def finish_pipeline_run(paths: S.Paths, mlflow_run_id: str, outcome: str, failed: bool) -> str:
    """Tag the pipeline run with ``airflow.outcome`` and mark it FINISHED (or FAILED when a stage
    failed); a run already terminated and not failed keeps its status. Returns the status."""
    cl = client(paths)
    run = cl.get_run(mlflow_run_id)
    cl.set_tag(mlflow_run_id, "airflow.outcome", outcome)
    status = "FAILED" if failed else "FINISHED"
    if run.info.status == "RUNNING" or failed:
        cl.set_terminated(mlflow_run_id, status)
    return status
