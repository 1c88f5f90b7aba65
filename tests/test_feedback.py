"""Feedback loop: batches -> validation / quarantine -> store (exactly once) -> ingest, DVC,
prequential scoring and the model history. Tiny fixtures only (conftest's MovieLens: 5 items,
4 users, 12 interactions in Dec 1997); the training pipeline is not run here.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ML_N_INTERACTIONS, ROOT, write_movielens

from genre_tasks import io
from genre_tasks.data import adapters
from genre_tasks import feedback
from genre_tasks.feedback import apply as feedback_apply
from genre_tasks.data import ingest
from genre_tasks import schema as S
from genre_tasks.config import ParamsError, from_dict
from genre_tasks.errors import StageError

LOGICAL = "2026-01-05T00:00:00+00:00"
T0 = 1_700_000_000  # 2023-11-14: after the fixture's data, before LOGICAL


# --- fixtures -------------------------------------------------------------------------------
@pytest.fixture
def params() -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["ingest"] = {**p["ingest"], "adapter": "movielens-100k", "max_users": None, "until": None}
    p["feedback"] = {"prequential": False, "dvc": False}
    return p


@pytest.fixture
def paths(tmp_path) -> S.Paths:
    paths = S.Paths(tmp_path / "project")
    write_movielens(paths.source)
    return paths


@pytest.fixture
def fp(paths) -> feedback.FeedbackPaths:
    return feedback.FeedbackPaths(paths)


def rows(*events) -> pd.DataFrame:
    """Canonical interactions from (user, item, timestamp, rating) tuples."""
    df = pd.DataFrame(events, columns=[S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.RATING])
    return adapters.canonical_interactions(df)


def write_batch(fp: feedback.FeedbackPaths, batch_id: str, df: pd.DataFrame, fmt: str = "parquet") -> Path:
    fp.incoming.mkdir(parents=True, exist_ok=True)
    path = fp.incoming / f"{batch_id}.{fmt}"
    if fmt == "parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)
    return path


GOOD = rows(("1", "3", T0, 4.0), ("2", "1", T0 + 60, 2.0), ("7", "5", T0 + 120, 5.0))


def n_ingested(params, paths) -> int:
    p = from_dict(ingest.IngestParams, params["ingest"], "ingest")
    return ingest.run(p, paths)["n_interactions"]


# --- the happy path -------------------------------------------------------------------------
def test_good_batch_is_applied_once(params, paths, fp):
    write_batch(fp, "2026-W01", GOOD)
    out = feedback.run(params, paths, LOGICAL)
    assert out["batches"] == {"2026-W01": "applied"} and out["applied"] == ["2026-W01"]
    assert out["record"]["status"] == "recorded" and out["record"]["rows"] == 3
    ledger = adapters.read_ledger(paths.source)
    assert list(ledger) == ["2026-W01"] and ledger["2026-W01"]["rows"] == 3
    assert ledger["2026-W01"]["applied_at"] == "2026-01-05T00:00:00Z"  # the logical date
    part = adapters.part_path(paths.source, "2026-W01")
    pd.testing.assert_frame_equal(adapters.read_part(part), GOOD)
    assert not list(fp.incoming.iterdir())
    assert sorted(p.name for p in (fp.applied / "2026-W01").iterdir()) == ["2026-W01.parquet", "report.json"]
    assert n_ingested(params, paths) == ML_N_INTERACTIONS + 3

    # the same batch again (e.g. re-delivered): recognised, nothing changes
    before = (part.read_bytes(), adapters.ledger_path(paths.source).read_bytes())
    write_batch(fp, "2026-W01", GOOD)
    again = feedback.run(params, paths, "2026-02-01")
    assert again["batches"] == {"2026-W01": "already_applied"} and again["applied"] == []
    assert again["record"]["status"] == "up_to_date"
    assert (part.read_bytes(), adapters.ledger_path(paths.source).read_bytes()) == before
    assert n_ingested(params, paths) == ML_N_INTERACTIONS + 3
    assert not list(fp.incoming.iterdir())
    assert (fp.applied / "2026-W01" / "report.json").exists()  # the first apply's report is kept


def test_csv_batch_and_store_order_in_ingest(params, paths, fp):
    """CSV batches are parsed like the adapters do; ingest appends parts in batch-id order
    after the base data, and reports them in metrics/ingest.json."""
    csv = GOOD.astype(object).assign(timestamp=["2023-11-14T22:13:20Z", str(T0 + 60), str(T0 + 120)])
    write_batch(fp, "b2", rows(("3", "2", T0 + 500, 3.0)))
    write_batch(fp, "b1", csv, fmt="csv")
    out = feedback.run(params, paths, LOGICAL)
    assert out["applied"] == ["b1", "b2"]
    p = from_dict(ingest.IngestParams, params["ingest"], "ingest")
    summary = ingest.run(p, paths)
    assert summary["n_feedback_batches"] == 2 and summary["n_feedback_rows"] == 4
    assert summary["feedback_batches"] == ["b1", "b2"] and summary["max_timestamp"] == T0 + 500
    inter = pd.read_parquet(paths.raw_interactions)
    assert dict(inter.dtypes.astype(str)) == S.INTERACTION_DTYPES
    assert inter[S.TIMESTAMP].tolist()[-4:] == [T0, T0 + 60, T0 + 120, T0 + 500]
    assert io.read_json(paths.metrics("ingest"))["feedback_batches"] == ["b1", "b2"]


def test_ingest_until_cuts_the_base_only_and_ignores_orphan_parts(params, paths, fp):
    write_batch(fp, "late", rows(("1", "4", T0, 5.0)))
    feedback.run(params, paths, LOGICAL)
    # an interrupted apply left a part without ledger entry: ingest ignores it
    rows(("2", "5", T0 + 9, 1.0)).to_parquet(adapters.part_path(paths.source, "zz-orphan"), index=False)
    p = from_dict(ingest.IngestParams, {**params["ingest"], "until": "1997-12-04T15:55:55"}, "ingest")
    summary = ingest.run(p, paths)
    # base rows before 881250955 (6 of 12) + the applied batch
    assert summary["n_interactions"] == 6 + 1 and summary["n_feedback_batches"] == 1
    assert p.until_timestamp() == 881250955
    with pytest.raises(ParamsError, match="ingest.until"):
        from_dict(ingest.IngestParams, {**params["ingest"], "until": "next week"}, "ingest")
    unquoted = yaml.safe_load("until: 1998-03-02")["until"]  # a datetime.date
    p = from_dict(ingest.IngestParams, {**params["ingest"], "until": unquoted}, "ingest")
    assert p.until == "1998-03-02" and p.until_timestamp() == 888796800


# --- bad batches ------------------------------------------------------------------------------
BAD = {
    "rating-11": (rows(("1", "3", T0, 11.0)), "rating is between 0 and 5"),
    "unknown-item": (rows(("1", "99", T0, 4.0)), "item_id exists in items"),
    "future": (rows(("1", "3", 1_800_000_000, 4.0)), "not after the run's logical date"),
    "dup-in-batch": (rows(("1", "3", T0, 4.0), ("1", "3", T0, 5.0)), "events are unique"),
    "dup-in-store": (rows(("10", "1", 881250949, 4.0)), "already in the interaction store"),
    "no-rating": (pd.DataFrame({S.USER_ID: ["1"], S.ITEM_ID: ["3"], S.TIMESTAMP: [T0]}),
                  "each row has a rating or a label"),
}


def test_bad_batches_are_quarantined_and_never_touch_the_store(params, paths, fp):
    for batch_id, (df, _) in BAD.items():
        write_batch(fp, batch_id, df)
    (fp.incoming / "empty.parquet").write_bytes(b"")
    (fp.incoming / "garbage.parquet").write_bytes(b"not parquet")
    out = feedback.run(params, paths, LOGICAL)
    assert set(out["quarantined"]) == {*BAD, "empty", "garbage"} and out["applied"] == []
    for batch_id, (_, rule) in BAD.items():
        folder = fp.quarantine / batch_id
        assert sorted(p.name for p in folder.iterdir()) == sorted([f"{batch_id}.parquet", "message.txt", "report.json"])
        report = json.loads((folder / "report.json").read_text())
        message = (folder / "message.txt").read_text()
        assert report["success"] is False and rule in message, (batch_id, message)
        broken = [e["rule"] for e in report["tables"]["interactions"]["expectations"] if not e["success"]]
        assert any(rule in r for r in broken) and len(broken) == 1, (batch_id, broken)
    assert "table has at least 1 row" in (fp.quarantine / "empty" / "message.txt").read_text()
    assert "readable table" in (fp.quarantine / "garbage" / "message.txt").read_text()
    assert not list(fp.incoming.iterdir())
    assert adapters.read_ledger(paths.source) == {}
    assert not adapters.store_dir(paths.source).exists()
    assert n_ingested(params, paths) == ML_N_INTERACTIONS
    # the future rule is relative to the run's logical date, not the wall clock
    write_batch(fp, "future", BAD["future"][0])
    assert feedback.run(params, paths, "2027-06-01")["applied"] == ["future"]


def test_allow_new_items_and_conflicting_batch_id(params, paths, fp):
    write_batch(fp, "new-item", rows(("1", "99", T0, 4.0)))
    v = feedback.validate_batch(params, paths, "new-item", LOGICAL, allow_new_items=True)
    assert v["status"] == "valid" and v["new_items"] == 1
    record = io.read_json(fp.validated / "new-item.json")
    assert record["report"]["batch"]["new_item_ids"] == ["99"]
    feedback.apply_batches(params, paths, ["new-item"], LOGICAL)
    # the same id with other content is refused (a batch id is applied once)
    write_batch(fp, "new-item", rows(("2", "3", T0, 4.0)))
    out = feedback.run(params, paths, LOGICAL)
    assert out["quarantined"] == ["new-item"]
    assert "applied once" in (fp.quarantine / "new-item" / "message.txt").read_text()
    assert adapters.read_ledger(paths.source)["new-item"]["rows"] == 1


def test_apply_rechecks_events_of_batches_applied_before(params, paths, fp):
    """Two batches validated together may share events: the later one is quarantined when it
    is applied, against the store as it is then."""
    write_batch(fp, "a", GOOD)
    write_batch(fp, "b", GOOD.head(1))
    out = feedback.run(params, paths, LOGICAL)
    assert out["batches"] == {"a": "applied", "b": "quarantined"}
    assert "checked again at apply time" in (fp.quarantine / "b" / "message.txt").read_text()
    assert list(adapters.read_ledger(paths.source)) == ["a"]


def test_apply_needs_a_validation_record_of_the_same_content(params, paths, fp):
    write_batch(fp, "x", GOOD)
    with pytest.raises(StageError, match="no validation record"):
        feedback.apply_batch(params, paths, "x", LOGICAL)
    assert feedback.validate_batch(params, paths, "x", LOGICAL)["status"] == "valid"
    write_batch(fp, "x", GOOD.head(2))  # replaced after validation
    with pytest.raises(StageError, match="no validation record"):
        feedback.apply_batch(params, paths, "x", LOGICAL)
    assert adapters.read_ledger(paths.source) == {}


# --- crash safety -----------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["part", "ledger"])
def test_crash_mid_apply_leaves_the_store_without_the_batch_and_a_retry_applies_it(
        params, paths, fp, monkeypatch, where):
    write_batch(fp, "w1", GOOD)
    assert feedback.validate_batch(params, paths, "w1", LOGICAL)["status"] == "valid"

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    if where == "part":  # the rename of the part's temporary file onto its name fails
        real = os.replace

        def replace(src, dst):
            if str(dst).endswith("w1.parquet") and "source" in str(dst):
                crash()
            return real(src, dst)

        monkeypatch.setattr(io.os, "replace", replace)
    else:  # the part is in place, the ledger write fails
        monkeypatch.setattr(feedback_apply, "_write_ledger", crash)
    with pytest.raises(OSError, match="simulated crash"):
        feedback.apply_batches(params, paths, ["w1"], LOGICAL)
    monkeypatch.undo()

    part = adapters.part_path(paths.source, "w1")
    assert part.exists() == (where == "ledger")
    assert not [p for p in adapters.store_dir(paths.source).iterdir() if p.name.endswith(".tmp")]
    assert adapters.read_ledger(paths.source) == {}
    assert n_ingested(params, paths) == ML_N_INTERACTIONS  # the store holds no part of it
    assert (fp.incoming / "w1.parquet").exists()

    out = feedback.run(params, paths, LOGICAL)  # the next run retries
    assert out["applied"] == ["w1"]
    assert n_ingested(params, paths) == ML_N_INTERACTIONS + 3
    pd.testing.assert_frame_equal(adapters.read_part(part), GOOD)


def test_store_modified_outside_the_loop_is_refused(params, paths, fp):
    write_batch(fp, "w1", GOOD)
    feedback.run(params, paths, LOGICAL)
    GOOD.head(1).to_parquet(adapters.part_path(paths.source, "w1"), index=False)
    with pytest.raises(StageError, match="content differs from the ledger"):
        n_ingested(params, paths)


# --- DVC ----------------------------------------------------------------------------------------
def test_record_without_dvc_repo_warns_and_still_records(params, paths, fp, caplog):
    params["feedback"]["dvc"] = True
    write_batch(fp, "w1", GOOD)
    out = feedback.run(params, paths, LOGICAL)
    assert out["record"]["status"] == "recorded"
    assert out["record"]["dvc"].startswith("skipped: not a DVC repository")
    assert "is not a DVC repository" in caplog.text
    assert feedback.unrecorded(fp) == []


def _sh(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_dvc_records_and_pushes_each_store_version(tmp_path, params):
    """In a scratch git + DVC repo with a local remote: the first record creates the dvc.lock
    entry of stage source (no dvc.lock before), each later one updates it; the remote holds
    every version and `dvc status` is clean after each record."""
    repo = tmp_path / "repo"
    (repo / "genre_tasks" / "data").mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / "genre_tasks" / "data" / "source.py", repo / "genre_tasks" / "data" / "source.py")
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    remote = tmp_path / "remote"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    _sh(["git", "init", "-q"], repo, env)
    _sh([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    _sh([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(remote)], repo, env)
    paths = S.Paths(repo)
    write_movielens(paths.source)
    fp = feedback.FeedbackPaths(paths)
    params["feedback"] = {"prequential": False, "dvc": True, "dvc_push": True}
    assert not (repo / "dvc.lock").exists()

    md5s = []
    for i, batch_id in enumerate(["w1", "w2"]):
        write_batch(fp, batch_id, rows(("1", "3", T0 + i, 4.0)))
        out = feedback.run(params, paths, LOGICAL)
        assert out["applied"] == [batch_id]
        rec = out["record"]
        assert rec["dvc"] == "pushed" and rec["batches"] == [batch_id] and rec["stage"] == "source"
        lock = yaml.safe_load((repo / "dvc.lock").read_text())
        (out_entry,) = lock["stages"]["source"]["outs"]
        assert out_entry["path"] == "data/source" and out_entry["md5"] == rec["source_md5"]
        md5s.append(rec["source_md5"])
        assert "up to date" in _sh([sys.executable, "-m", "dvc", "status", "source"], repo, env)
        assert "in sync" in _sh([sys.executable, "-m", "dvc", "status", "-c", "source"], repo, env)
    assert md5s[0] != md5s[1] and md5s[1].endswith(".dir")
    # nothing new: nothing recorded
    assert feedback.record_store(params, paths)["status"] == "up_to_date"
    # the remote really holds the store: a fresh checkout of the old version gets it back
    shutil.rmtree(paths.source)
    _sh([sys.executable, "-m", "dvc", "checkout", "source"], repo, env)
    assert sorted(adapters.read_ledger(paths.source)) == ["w1", "w2"]


# --- prequential scoring -----------------------------------------------------------------------
class FixedScores:
    """A recommender whose scores are one fixed vector (item i gets ``weights[i]``)."""

    name = "fixed"

    def __init__(self, weights):
        self.weights = np.asarray(weights, dtype=np.float32)

    def fit(self, data):
        return self

    def score(self, histories, data):
        return np.tile(self.weights, (len(histories), 1))


def catalog(n_items: int = 6):
    from genre_tasks.registry import serving

    items = pd.DataFrame({S.ITEM_ID: [str(i) for i in range(1, n_items + 1)],
                          S.TITLE: [f"t{i}" for i in range(n_items)],
                          S.GENRES: [["Drama"]] * n_items,
                          "popularity": np.arange(n_items, dtype=np.int64),
                          "timestamp": np.zeros(n_items, dtype=np.int64)})
    vectors = np.eye(n_items, 4, dtype=np.float32)
    return serving.serving_fit(items, vectors)


def test_score_batch_protocol():
    """Histories from the store (positives, in time order), store items excluded from the
    ranking, new users counted but not evaluated, AUC over each user's rated batch items."""
    store = rows(("a", "1", 10, 5.0), ("a", "2", 11, 2.0), ("b", "3", 12, 1.0), ("z", "4", 13, 5.0))
    batch = rows(("a", "5", 20, 5.0), ("a", "6", 21, 1.0), ("a", "1", 22, 5.0),  # item 1 seen: no target
                 ("b", "5", 23, 5.0),  # b has no positive history: not evaluated
                 ("new", "5", 24, 5.0), ("a", "nope", 25, 5.0))
    good = FixedScores([6, 0, 0, 0, 5, 1])  # item "5" best among unseen, "6" worst
    out = feedback.score_batch(good, catalog(), store, batch, 4.0, seed=1)
    m, c = out["metrics"], out["counts"]
    assert c == {"batch_rows": 6, "batch_users": 3, "batch_positives": 5, "known_users": 2,
                 "new_users": 1, "users_with_history": 1, "eval_users": 1, "impressions": 1,
                 "unknown_item_rows": 1}
    assert m["n_users"] == 1 and m["n_impressions"] == 1
    assert m["ndcg@10"] == pytest.approx(1.0) and m["recall@10"] == 1.0 and m["mrr"] == 1.0
    assert m["auc"] == 1.0
    bad = feedback.score_batch(FixedScores([0, 0, 0, 0, -5, 9]), catalog(), store, batch, 4.0, seed=1)
    assert bad["metrics"]["auc"] == 0.0 and bad["metrics"]["mrr"] < 1.0
    none = feedback.score_batch(good, catalog(), store.head(0), batch, 4.0, seed=1)
    assert none["counts"]["eval_users"] == 0 and none["metrics"]["n_users"] == 0


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("GENRE_MLFLOW_ARTIFACTS", str(tmp_path / "mlartifacts"))
    monkeypatch.delenv("GENRE_MLFLOW_RUN_ID", raising=False)
    from genre_tasks.registry import tracking_store

    tracking_store.init_store(S.Paths(tmp_path))  # as `genre tracking-init` does on a real project
    return uri


def test_prequential_beside_apply_scores_the_store_before_the_batches(params, paths, fp, mlflow_uri):
    """The DAG runs prequential beside apply_batches. Scored before or after the apply, each batch
    gets the same numbers: the store without this run's batches (plus the earlier ones of the
    run), the batch read from its archive once applied."""
    import shutil

    class Model:
        recommender = FixedScores([5, 4, 3, 2, 1])
        fit = catalog(5)

    params["feedback"]["prequential"] = True
    write_batch(fp, "w1", rows(("1", "3", T0, 5.0), ("1", "4", T0 + 1, 1.0)))
    write_batch(fp, "w2", rows(("9", "2", T0 + 5, 5.0), ("9", "1", T0 + 6, 5.0)))
    write_batch(fp, "w3", rows(("9", "3", T0 + 9, 5.0)))
    valid = [feedback.validate_batch(params, paths, b, LOGICAL)["batch_id"] for b in ("w1", "w2", "w3")]
    before = feedback.prequential(params, paths, valid, LOGICAL, model=Model(), version="1")
    records = {b: io.read_json(fp.prequential / f"{b}.json") for b in valid}
    shutil.rmtree(fp.prequential)  # score again, not reuse
    applied = feedback.apply_batches(params, paths, valid, LOGICAL)
    assert applied["applied"] == valid and not list(fp.incoming.glob("w*"))  # in the store, archived
    after = feedback.prequential(params, paths, valid, LOGICAL, model=Model(), version="1")
    assert after == before and {s["status"] for s in after.values()} == {"scored"}
    assert after["w3"]["eval_users"] == 1  # w2 (before it in the run) is its user's history
    for b in valid:
        rec = io.read_json(fp.prequential / f"{b}.json")
        assert {k: rec[k] for k in ("sha1", "store_rows_before", "metrics", "counts")} == \
            {k: records[b][k] for k in ("sha1", "store_rows_before", "metrics", "counts")}
    assert records["w1"]["store_rows_before"] == ML_N_INTERACTIONS


def test_prequential_scores_before_apply_logs_and_feeds_the_history(params, paths, fp, mlflow_uri):
    """The champion is scored on each good batch with the store + the earlier batches of the
    run as history; records go to prequential/<id>.json and MLflow; `genre history` reads
    versions, their ingest records and their prequential scores back."""
    import mlflow

    from genre_tasks.feedback import history
    from genre_tasks.registry import tracking_store

    class Model:  # what serving.load returns: .recommender and .fit (the catalogue)
        recommender = FixedScores([5, 4, 3, 2, 1])
        fit = catalog(5)

    params["feedback"]["prequential"] = True
    write_batch(fp, "w1", rows(("1", "3", T0, 5.0), ("1", "4", T0 + 1, 1.0)))
    write_batch(fp, "w2", rows(("9", "2", T0 + 5, 5.0), ("9", "1", T0 + 6, 5.0)))  # 9 is new in w1? no: new
    write_batch(fp, "w3", rows(("9", "3", T0 + 9, 5.0)))  # 9 has a history thanks to w2
    valid = [feedback.validate_batch(params, paths, b, LOGICAL)["batch_id"] for b in ("w1", "w2", "w3")]
    scores = feedback.prequential(params, paths, valid, LOGICAL, model=Model(), version="1")
    assert {b: s["status"] for b, s in scores.items()} == {"w1": "scored", "w2": "scored", "w3": "scored"}
    assert scores["w2"]["eval_users"] == 0 and scores["w2"]["new_users"] == 1
    assert scores["w3"]["eval_users"] == 1  # history from w2, which precedes it in this run
    rec = io.read_json(fp.prequential / "w1.json")
    assert rec["model_version"] == "1" and rec["counts"]["eval_users"] == 1
    assert rec["metrics"]["auc"] == 1.0 and rec["store_rows_before"] == ML_N_INTERACTIONS
    # idempotent: same content and champion -> the record is reused, no second MLflow run
    again = feedback.prequential(params, paths, ["w1"], LOGICAL, model=Model(), version="1")
    assert again["w1"]["status"] == "reused"
    cl = tracking_store.client(paths)
    runs = cl.search_runs([tracking_store.configure(paths)], filter_string="tags.`genre.prequential` = '1'")
    assert sorted(r.data.tags["genre.feedback.batch"] for r in runs) == ["w1", "w2", "w3"]
    w1 = next(r for r in runs if r.data.tags["genre.feedback.batch"] == "w1")
    assert w1.data.metrics["auc"] == 1.0 and w1.data.metrics["count.eval_users"] == 1
    # no champion in the registry: skipped with the reason, nothing breaks
    skipped = feedback.prequential(params, paths, ["w1"], LOGICAL)
    assert skipped["w1"]["status"] == "skipped" and "champion" in skipped["w1"]["reason"]

    # --- the history of two registered versions (registry entries made by hand) ---
    name = params["promote"]["model_name"]
    exp = tracking_store.configure(paths)
    cl.create_registered_model(name)
    for v, (batches, cutoff, decision) in enumerate([([], 881250960, "promoted"),
                                                     (["w1"], T0 + 1, "rejected")], start=1):
        run = cl.create_run(exp)
        cl.log_metric(run.info.run_id, "test.ndcg_at_10", 0.1 * v)
        cl.log_dict(run.info.run_id, {"max_timestamp": cutoff, "feedback_batches": batches,
                                      "n_interactions": 12 + len(batches)}, "metrics/ingest.json")
        mv = cl.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
        for k, val in {"decision": decision, "reasons": f"because {v}", "run_id": run.info.run_id}.items():
            cl.set_model_version_tag(name, mv.version, k, val)
    cl.set_registered_model_alias(name, "champion", "1")
    out = history.history(params, paths)
    r1, r2 = out["rows"]
    assert r1["promoted"] and r1["aliases"] == ["champion"] and r1["prequential_batch"] == "w1"
    assert r1["prequential"]["auc"] == 1.0 and r1["prequential_batches_scored"] == 3
    assert r1["test"]["ndcg@10"] == pytest.approx(0.1) and r1["data_cutoff"] == 881250960
    assert not r2["promoted"] and r2["batches"] == ["w1"] and r2["prequential_batch"] is None
    table = out["markdown"]
    assert "| v1 (champion) | 1997-12-04 15:56 | 0 | w1: " in table and "because 2" in table
    assert Path(out["plot"]).stat().st_size > 1000 and out["plot"].endswith("plots/history.png")
    assert mlflow.get_tracking_uri() == mlflow_uri


# --- CLI ------------------------------------------------------------------------------------
def test_feedback_cli(params, paths, fp, capsys, tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    write_batch(fp, "w1", GOOD)
    write_batch(fp, "bad", BAD["rating-11"][0])
    base = ["--root", str(paths.root), "--params", str(params_file)]
    assert feedback.feedback_cli([*base, "run", "--logical-date", LOGICAL, "--no-dvc"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["batches"] == {"bad": "quarantined", "w1": "applied"}
    assert "batch bad quarantined: rating is between 0 and 5" in captured.err
    assert feedback.feedback_cli([*base, "status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["store_batches"] == ["w1"] and status["quarantined"] == ["bad"]
    assert status["store_rows"] == ML_N_INTERACTIONS + 3 and status["incoming"] == []
    assert feedback.feedback_cli([*base, "replay", "--next"]) == 1
    assert "replay --init" in capsys.readouterr().err
