"""Prequential scoring: the registered ``@champion`` scored on each good batch before anything is
trained on it (metrics to ``prequential/<batch_id>.json`` and an MLflow run)."""
from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from genre_tasks import io, logs
from genre_tasks import schema as S
from genre_tasks.feedback.params import (
    CHAMPION,
    FeedbackPaths,
    PREQUENTIAL_METRICS,
    TAG_BATCH,
    TAG_MODEL,
    TAG_PREQUENTIAL,
    TAG_SHA1,
    TAG_VERSION,
    _iso,
    as_datetime,
    settings,
)
from genre_tasks.feedback.apply import store_lock
from genre_tasks.feedback.batches import _time_range, archived_files, batch_files, load_store, read_batch


# --------------------------------------------------------------------------------------
# prequential evaluation
# --------------------------------------------------------------------------------------
def score_batch(rec: Any, catalog: Any, store: pd.DataFrame, batch: pd.DataFrame,
                positive_threshold: float = 4.0, seed: int = 42) -> dict:
    """Score ``rec`` (a data.Recommender) on ``batch`` given the ``store`` it follows.

    ``catalog`` is a user-free :class:`data.FitData` of the model's item catalogue (what the
    served model carries: item ids, vectors, genres, popularity). Users of the batch get their
    store interactions as fit data: positives in time order as histories, every store item as
    seen (excluded from the ranking). Protocol (global_temporal, full ranking): a user is
    evaluated when they have a positive history and >= 1 positive in the batch on a catalogue
    item they have not seen; targets = those items. Impressions: per user with a history, the
    batch items they rated (AUC needs >= 1 positive and >= 1 negative).

    Returns ``{"metrics": {ndcg@10, recall@10, recall@20, mrr, hr@10, auc, ..., <m>_se,
    n_users, n_impressions}, "counts": {batch_rows, batch_users, batch_positives, known_users,
    new_users, users_with_history, eval_users, impressions, unknown_item_rows}}``.
    """
    from scipy import sparse

    from genre_tasks.models import views as D
    from genre_tasks.evaluation import protocol as evaluation
    from genre_tasks.data.preprocess import positive_labels

    index = pd.Series(np.arange(catalog.n_items, dtype=np.int64),
                      index=pd.Index(np.asarray(catalog.item_ids).astype(str)))
    users = sorted(batch[S.USER_ID].dropna().astype(str).unique())
    uidx = pd.Series(np.arange(len(users), dtype=np.int64), index=pd.Index(users, dtype=object))
    n_users = len(users)

    def frame(df: pd.DataFrame) -> pd.DataFrame:
        out = df[df[S.USER_ID].astype(str).isin(uidx.index)].copy()
        out["_order"] = np.arange(len(out))
        out[S.USER_IDX] = uidx.reindex(out[S.USER_ID].astype(str)).to_numpy()
        out[S.ITEM_IDX] = index.reindex(out[S.ITEM_ID].astype(str)).to_numpy()
        out[S.POSITIVE] = positive_labels(out, positive_threshold).to_numpy()
        return out

    hist_rows = frame(store)
    known_users = int(hist_rows[S.USER_IDX].nunique()) if len(hist_rows) else 0
    hist_rows = hist_rows[hist_rows[S.ITEM_IDX].notna()]
    hist_rows = hist_rows.sort_values([S.TIMESTAMP, "_order"], kind="stable")
    hist_rows[S.ITEM_IDX] = hist_rows[S.ITEM_IDX].astype(np.int64)
    pos = hist_rows[hist_rows[S.POSITIVE]]
    shape = (n_users, catalog.n_items)
    seen = sparse.csr_matrix((np.ones(len(hist_rows), bool), (hist_rows[S.USER_IDX].to_numpy(np.int64),
                              hist_rows[S.ITEM_IDX].to_numpy(np.int64))), shape=shape)
    positives = sparse.csr_matrix((np.ones(len(pos), np.float32), (pos[S.USER_IDX].to_numpy(np.int64),
                                   pos[S.ITEM_IDX].to_numpy(np.int64))), shape=shape)
    positives.data[:] = 1.0
    by_user = pos.groupby(S.USER_IDX, sort=True)[S.ITEM_IDX].agg(lambda s: s.to_numpy(np.int64))
    histories = [np.asarray(by_user.get(u, np.empty(0, np.int64)), dtype=np.int64)
                 for u in range(n_users)]
    fit = dataclasses.replace(catalog, phase="test", n_users=n_users,
                              user_ids=np.asarray(users, dtype=object), rows=hist_rows,
                              positives=positives, seen=seen, histories=histories)

    rows = frame(batch)
    unknown_items = int(rows[S.ITEM_IDX].isna().sum())
    rows = rows[rows[S.ITEM_IDX].notna()].copy()
    rows[S.ITEM_IDX] = rows[S.ITEM_IDX].astype(np.int64)
    has_hist = np.array([len(h) > 0 for h in histories], dtype=bool)
    seen_lil = seen.tolil()
    eval_users, targets, impressions = [], [], []
    for u, g in rows.groupby(S.USER_IDX, sort=True):
        u = int(u)
        if not has_hist[u]:
            continue
        seen_u = set(seen_lil.rows[u])
        tgt = np.unique(g.loc[g[S.POSITIVE], S.ITEM_IDX].to_numpy(np.int64))
        tgt = np.asarray([i for i in tgt if i not in seen_u], dtype=np.int64)
        if len(tgt):
            eval_users.append(u)
            targets.append(tgt)
        imp = g.drop_duplicates(S.ITEM_IDX, keep="last")
        labels = imp[S.POSITIVE].to_numpy().astype(np.int8)
        if 0 < labels.sum() < len(labels):
            impressions.append((u, imp[S.ITEM_IDX].to_numpy(np.int64), labels))
    ev = D.EvalData(phase="test", users=np.asarray(eval_users, dtype=np.int64), targets=targets,
                    impressions=impressions)
    counts = {
        "batch_rows": int(len(batch)),
        "batch_users": n_users,
        "batch_positives": int(positive_labels(batch, positive_threshold).sum()),
        "known_users": known_users,
        "new_users": n_users - known_users,
        "users_with_history": int(has_hist.sum()),
        "eval_users": len(eval_users),
        "impressions": len(impressions),
        "unknown_item_rows": unknown_items,
    }
    if not eval_users and not impressions:
        return {"metrics": {"n_users": 0, "n_impressions": 0}, "counts": counts}
    res = evaluation.evaluate_recommender(rec, fit, ev, seed)
    metrics = {k: (float(v) if v is not None and np.isfinite(v) else None)
               for k, v in res.metrics.items()}
    return {"metrics": metrics, "counts": counts}


def load_champion(paths: S.Paths, model_name: str) -> tuple[Any, str | None, str]:
    """``(model, version, reason)``: the ``@champion`` as a serving.GenreRecommenderModel, or
    ``(None, None, why not)`` when there is no registry / registered model / champion yet."""
    from genre_tasks.registry import tracking_store

    uri = tracking_store.tracking_uri(paths)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return None, None, f"no MLflow database at {uri} yet"
    from mlflow.exceptions import MlflowException

    tracking_store.set_uris(paths)
    cl = tracking_store.client(paths)
    try:
        mv = cl.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None, None, f"no {model_name}@{CHAMPION} in the registry yet"
    from genre_tasks.registry import serving

    model = serving.load(f"models:/{model_name}/{mv.version}", cl)
    return model, str(mv.version), ""


def log_prequential(paths: S.Paths, record: dict) -> str:
    """Log a prequential record to MLflow (one run per batch x model version; an existing
    finished run of the same batch content and version is reused). Returns the run id."""
    from genre_tasks.registry import tracking, tracking_store

    exp_id = tracking_store.configure(paths)
    cl = tracking_store.client(paths)
    tags = {TAG_PREQUENTIAL: "1", TAG_BATCH: record["batch_id"], TAG_MODEL: record["model_name"],
            TAG_VERSION: record["model_version"], TAG_SHA1: record.get("sha1") or "",
            "genre.logical_date": record.get("logical_date") or ""}
    found = cl.search_runs(
        [exp_id], max_results=1,
        filter_string=" and ".join(f"tags.`{k}` = '{tags[k]}'"
                                   for k in (TAG_PREQUENTIAL, TAG_BATCH, TAG_VERSION, TAG_SHA1)))
    if found and found[0].info.status == "FINISHED":
        return found[0].info.run_id
    run_id = (found[0].info.run_id if found else cl.create_run(
        exp_id, run_name=f"prequential-{record['batch_id']}-v{record['model_version']}",
        tags={**tags, "mlflow.note.content":
              f"@champion v{record['model_version']} scored on feedback batch "
              f"{record['batch_id']} before training on it"}).info.run_id)
    tracking.log_metrics(run_id, record["metrics"], paths)
    tracking.log_metrics(run_id, record["counts"], paths, prefix="count.")
    cl.log_dict(run_id, record, "prequential.json")
    cl.set_terminated(run_id)
    return run_id


def prequential(params: dict, paths: S.Paths, batch_ids: Sequence[str],
                logical_date: str | dt.datetime, *, enabled: bool | None = None,
                model: Any = None, version: str | None = None) -> dict[str, dict]:
    """Score the ``@champion`` on each batch (in batch-id order) before it is applied.

    Batch b is scored with the store as it will be when b is applied: the store without the
    batches of this call, plus those before b. The store and the batch files are read under the
    store lock, so this may run while :func:`apply_batches` applies the same batches (the DAG
    runs the two side by side): a batch already applied is left out of the store and read from
    its archive (``applied/<id>/``). Writes ``prequential/<batch_id>.json`` and an MLflow
    run per batch. Returns ``{batch_id: {status, model_version?, ndcg@10, ..., eval_users}}``
    (status ``scored`` | ``reused`` | ``skipped``). ``model``/``version`` replace the champion
    (tests). An existing record of the same content and champion version is reused.
    """
    from genre_tasks.data import adapters

    s = settings(params, prequential=enabled)
    fp = FeedbackPaths(paths, s.feedback)
    ids = sorted(set(batch_ids))
    if not ids:
        return {}
    if not s.feedback.prequential:
        return {b: {"status": "skipped", "reason": "feedback.prequential is off"} for b in ids}
    moment = as_datetime(logical_date)
    out: dict[str, dict] = {}
    with logs.stage("feedback-prequential") as slog:
        reason = ""
        if model is None:
            model, version, reason = load_champion(paths, s.model_name)
        if model is None:
            slog.logger.warning("prequential scoring skipped: %s", reason)
            return {b: {"status": "skipped", "reason": reason} for b in ids}
        slog.logger.info("scoring %s@%s (v%s) on %d batch(es)", s.model_name, CHAMPION, version, len(ids))
        with store_lock(fp):  # a consistent store and batch files, also mid-apply
            store = load_store(s, fp, exclude=ids)[1]
            batches = {}
            for batch_id in ids:
                files = batch_files(fp, batch_id) or archived_files(fp, batch_id)
                if files:
                    batches[batch_id] = read_batch(files[0], s.feedback)[0]
        for batch_id in ids:
            if batch_id not in batches:
                out[batch_id] = {"status": "skipped", "reason": "no batch file"}
                continue
            batch = batches[batch_id]
            sha1 = adapters.content_hash(batch)
            target = fp.prequential / f"{batch_id}.json"
            old = io.read_json(target) if target.exists() else None
            if old and old.get("sha1") == sha1 and old.get("model_version") == version:
                out[batch_id] = {"status": "reused", **_small_prequential(old)}
            else:
                result = score_batch(model.recommender, model.fit, store, batch,
                                     s.positive_threshold, s.seed)
                record = {"batch_id": batch_id, "sha1": sha1, "model_name": s.model_name,
                          "model_version": version, "logical_date": _iso(int(moment.timestamp())),
                          "store_rows_before": int(len(store)), **_time_range(batch), **result}
                try:
                    record["mlflow_run_id"] = log_prequential(paths, record)
                except Exception as exc:  # noqa: BLE001 - the local record still counts
                    slog.logger.warning("prequential record of %s not logged to MLflow: %s",
                                        batch_id, exc)
                io.write_json(record, target)
                slog.wrote(target, f"prequential metrics of v{version}")
                out[batch_id] = {"status": "scored", **_small_prequential(record)}
            m = out[batch_id]
            slog.logger.info("batch %s: v%s nDCG@10=%s Recall@10=%s MRR=%s AUC=%s (%s users, %s "
                             "impressions)", batch_id, version, *(_fmt(m.get(k)) for k in PREQUENTIAL_METRICS),
                             m.get("eval_users"), m.get("impressions"))
            store = adapters.append_interactions(store, batch)
    return out


def _small_prequential(record: dict) -> dict:
    m, c = record.get("metrics", {}), record.get("counts", {})
    return {"model_version": record.get("model_version"),
            **{k: m.get(k) for k in PREQUENTIAL_METRICS},
            "eval_users": c.get("eval_users"), "impressions": c.get("impressions"),
            "batch_users": c.get("batch_users"), "new_users": c.get("new_users")}


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)
