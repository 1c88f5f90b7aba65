"""MLflow runs of the pipeline: one run per pipeline run, and the calls that write into it.

One MLflow run per pipeline run (:func:`pipeline_run`, or :func:`start_pipeline_run` /
:func:`finish_pipeline_run` for an Airflow DAG run), stamped with the lineage tags of
:mod:`genre_tasks.registry.provenance`. Writing: :func:`set_tags`, :func:`log_params`,
:func:`log_metrics`, :func:`log_artifact`; the run record a DAG run's workers share:
:func:`log_params_snapshot`, :func:`log_run_lock`, :func:`download_run_file`.

Where runs go (store, URIs, client): :mod:`genre_tasks.registry.tracking_store`. What each
stage and strategy records into the run (child runs, curves, test metrics, datasets):
:mod:`genre_tasks.registry.stage_logging`.

Metric names: MLflow allows ``[/\\w.\\- :]`` only, so ``ndcg@10`` is logged as ``ndcg_at_10``
(:func:`metric_key`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from genre_tasks import io
from genre_tasks import schema as S
from genre_tasks.registry.provenance import canonical_json, lineage_tags, params_hash
from genre_tasks.registry.tracking_store import (
    RUN_ID_ENV,
    client,
    configure,
    experiment_name,
    init_store,
    tracking_uri,
)

log = logging.getLogger("genre.tracking")


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
    return log_metric_steps(run_id, [(step, metrics)], paths, prefix)


def log_metric_steps(run_id: str, steps: Iterable[tuple[int, Mapping[str, Any]]], paths: S.Paths,
                     prefix: str = "") -> int:
    """:func:`log_metrics` for several steps (a curve) in as few requests as MLflow allows
    (``log_batch``, 500 values each): one transaction, not one per step (a 72-point fusion grid
    was 72 requests, ~1.5 s of the train task on the sqlite store)."""
    import time

    from mlflow.entities import Metric

    cl = client(paths)
    now = int(time.time() * 1000)
    batch = []
    for step, metrics in steps:
        for k, v in flatten(metrics).items():
            f = numeric(v)
            if f is not None:
                batch.append(Metric(metric_key(f"{prefix}{k}"), f, now, int(step)))
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


# --- the run record: params snapshot, dvc.lock (shared by a DAG run's workers) ----------------
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
