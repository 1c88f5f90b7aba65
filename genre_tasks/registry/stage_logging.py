"""What a pipeline run records into its MLflow run, stage by stage.

:func:`log_stage` (after each stage of a DAG run) and :func:`log_pipeline` (everything at
once, the promote stage): metrics files, artifacts, test metrics (:func:`log_evaluation`),
dataset inputs (:func:`log_lineage`), one nested child run per trained strategy
(:func:`log_training`) and one per hyper-parameter search trial under it (:func:`log_search`);
:func:`epoch_logger` logs training curves live.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from genre_tasks import io
from genre_tasks import schema as S
from genre_tasks.registry.provenance import _rel, canonical_json, combined_hash, data_hashes, split_mode
from genre_tasks.registry.tracking_store import RUN_ID_ENV, client
from genre_tasks.registry.tracking import (flatten, log_artifact, log_metric_steps, log_metrics, log_params,
                                           set_tags)

log = logging.getLogger("genre.tracking")

#: tag on a child run naming the strategy it records
STRATEGY_TAG = "genre.strategy"
#: tag on a hyper-parameter search trial's run (a child of its strategy's run): the trial number
TRIAL_TAG = "genre.search_trial"
PARENT_TAG = "mlflow.parentRunId"
#: tag naming the last stage that finished in a run, and one tag per stage (computed/run-cache/...)
LAST_STAGE_TAG = "genre.last_stage"
STAGE_TAG = "genre.stage."


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
            log_metric_steps(child_id, [(int(row[step_col]) if step_col else int(i),
                                         {k: v for k, v in row.items() if k != step_col})
                                        for i, row in df.iterrows()], paths)
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
    models = doc.get("models") or {}
    values = {f"{name}.{k}": v for name, metrics in models.items() for k, v in flatten(metrics).items()}
    selected = doc.get("selected")
    if isinstance(selected, str) and selected in models:
        values.update(flatten(models[selected]))
    return log_metrics(run_id, values, paths, prefix="test.")  # one request, not one per model


#: rows of a lineage dataset MLflow infers its schema from (:func:`log_lineage`)
SCHEMA_ROWS = 1000


def log_lineage(run_id: str, paths: S.Paths) -> list[str]:
    """Datasets as run inputs: the fit rows (context ``training``), the test rows (context
    ``test``) and the item table (``training``). Each digest starts with the md5 of its source
    file and each input is tagged with that md5 (``dvc_md5``), the combined ``data_hash`` and the
    split mode. Returns ``["name:context", ...]``."""
    import json
    import warnings

    import mlflow
    import pandas as pd
    from mlflow.entities import Dataset, DatasetInput, InputTag

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
            # MLflow infers the schema element by element (~1.5 s per 100k-row frame): from the
            # first SCHEMA_ROWS rows (the columns are typed: the same schema), the profile
            # (row and element counts) from the whole frame
            head = mlflow.data.from_pandas(as_object(df.head(SCHEMA_ROWS)), source=str(source.resolve()),
                                           name=name, digest=f"{md5[:10]}-{context[:2]}")._to_mlflow_entity()
            entity = Dataset(name=head.name, digest=head.digest, source_type=head.source_type, source=head.source,
                             schema=head.schema,
                             profile=json.dumps({"num_rows": int(len(df)), "num_elements": int(df.size)}))
            tags = [InputTag("mlflow.data.context", context), InputTag("dvc_md5", md5),
                    *(InputTag(k, v) for k, v in common.items())]
            inputs.append(DatasetInput(entity, tags))
            logged.append(f"{name}:{context}")
    client(paths).log_inputs(run_id, datasets=inputs)
    return logged


def log_pipeline(run_id: str, paths: S.Paths, params: Mapping | None) -> dict:
    """Everything a pipeline run records: params, training curves (child runs), test metrics,
    plots/tables/metrics files as artifacts, dataset lineage. Returns a small summary.

    What the run already holds is not logged again: in an Airflow run every stage task logged
    its stage live (:func:`log_stage`, tag ``genre.stage.<stage>``) and ``snapshot_params`` the
    params (tag ``genre.params_hash``), so promote adds only the metrics files (their final
    state). A CLI run (``genre promote`` after ``dvc repro``) gets everything here.
    (Re-logging it all cost promote ~8 s a run: lineage datasets, child runs, ~300 values.)"""
    tags = client(paths).get_run(run_id).data.tags
    live = {k[len(STAGE_TAG):] for k, v in tags.items() if k.startswith(STAGE_TAG) and v != "failed"}
    summary: dict[str, Any] = {"run_id": run_id, "logged_live": sorted(live)}
    if params is not None and "genre.params_hash" not in tags:
        summary["params"] = log_params(run_id, params, paths)
    artifacts: dict[Path, str] = {}
    if "train" not in live:
        summary["children"] = log_training(run_id, paths)
        train_metrics = paths.metrics("train")
        if train_metrics.exists():
            log_metrics(run_id, io.read_json(train_metrics), paths, prefix="train.")
        artifacts.update(_stage_artifacts("train", paths))
    if "evaluate" not in live:
        summary["test_metrics"] = log_evaluation(run_id, paths)
        artifacts.update(_stage_artifacts("evaluate", paths))
    if "validate" not in live:
        artifacts[paths.validation_summary] = "validation"
    if "preprocess" not in live:
        artifacts[paths.split_info] = "data"
    if paths.metrics_dir.exists():
        artifacts.update({f: "metrics" for f in sorted(paths.metrics_dir.glob("*.json"))})
    summary["artifacts"] = sorted(_rel(paths, f) for f, where in artifacts.items()
                                  if log_artifact(run_id, f, paths, where))
    if "preprocess" not in live:
        try:
            summary["inputs"] = log_lineage(run_id, paths)
        except Exception as exc:  # lineage is a record, never a reason to fail the pipeline
            log.warning("dataset lineage not logged: %s", exc)
            summary["inputs"] = []
    return summary


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
