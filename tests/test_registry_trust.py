"""The registry gate under hostile conditions: each test sets up a failure found by a hostile
review (corrupted inputs, a trigger-form payload, kills, races, a behaviour change with the
same weights, promote after a failed validation) and checks that @champion stays the best
model of the run and that refusals write nothing to the registry.

Uses the synthetic project of test_promote.py (a trained content model + evaluate outputs).
"""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from genre_tasks import io
from genre_tasks import schema as S
from genre_tasks.errors import StageError

from test_promote import (  # noqa: F401  (fixtures)
    ROOT,
    add_bad_model,
    add_variant,
    make_params,
    mlflow_db,
    model_name,
    project,
    promote,
    registry,
    tracking_env,
)


def snapshot(name: str, paths: S.Paths) -> dict:
    """Everything promote may write to MLflow: versions with tags/descriptions, aliases, runs."""
    from genre_tasks.registry import tracking_store

    cl = tracking_store.client(paths)
    versions = {mv.version: (dict(mv.tags), mv.description) for mv in cl.search_model_versions(f"name='{name}'")}
    aliases = dict(cl.get_registered_model(name).aliases)
    runs = [(r.info.run_id, r.info.status, dict(r.data.tags)) for r in
            cl.search_runs([e.experiment_id for e in cl.search_experiments()], max_results=10_000)]
    return {"versions": versions, "aliases": aliases, "runs": sorted(runs, key=lambda r: r[0])}


# --- corrupted inputs ------------------------------------------------------------------------------
@pytest.mark.slow
def test_shuffled_vectors_are_refused_and_nothing_is_written(project, model_name):
    """Original failure: vectors.npy rows shuffled, model retrained, and the challenger 'won'
    because the champion was re-scored on the shuffled vectors."""
    from genre_tasks.evaluation import evaluate
    from genre_tasks.models import train

    from test_promote import TINY_TRAIN

    promote(project, model_name)
    before = snapshot(model_name, project)
    vec = np.load(project.vectors)
    io.save_npy(vec[np.random.default_rng(0).permutation(len(vec))], project.vectors)
    with pytest.raises(StageError, match=r"vectors.npy: changed since train read it"):
        promote(project, model_name)
    assert snapshot(model_name, project) == before
    # ... and retrained on the shuffled file: train read bytes embed never wrote
    train.run(train.TrainParams(**TINY_TRAIN), project)
    evaluate.run(evaluate.EvaluateParams(baselines=("random", "mostpop")), project)
    with pytest.raises(StageError, match=r"vectors.npy: train read md5 \w+ but the embed stage recorded"):
        promote(project, model_name)
    assert snapshot(model_name, project) == before


@pytest.mark.slow
def test_the_champion_is_scored_on_its_own_bundle(project, model_name):
    """Today's vectors (here: shuffled) do not change the champion's score."""
    from genre_tasks.models import views as D
    from genre_tasks.evaluation import protocol as evaluation
    from genre_tasks.registry import serving
    from genre_tasks.registry.promote import _Named

    promote(project, model_name)
    champion = _Named(serving.load(f"models:/{model_name}@champion"), "champion")
    fit, ev = D.Dataset.load(project).phase("test")
    base = evaluation.evaluate_recommender(champion, fit, ev, 42)
    fit.item_vectors = fit.item_vectors[np.random.default_rng(1).permutation(fit.n_items)]
    fit.item_genres = np.zeros_like(fit.item_genres)
    again = evaluation.evaluate_recommender(champion, fit, ev, 42)
    assert again.metrics["ndcg@10"] == base.metrics["ndcg@10"] > 0.3
    np.testing.assert_array_equal(again.per_user["ndcg@10"], base.per_user["ndcg@10"])


@pytest.mark.slow
def test_promote_after_a_failed_validation_is_read_only(project, model_name):
    promote(project, model_name)
    before = snapshot(model_name, project)
    project.validation_summary.unlink()  # what a failed validate leaves (+ failure.json)
    io.write_json({"success": False}, project.validation_dir / "failure.json")
    with pytest.raises(StageError, match="last validation failed or never ran"):
        promote(project, model_name)
    with pytest.raises(StageError):
        promote(project, model_name, force=True, reason="ship it")
    assert snapshot(model_name, project) == before


# --- the trigger form --------------------------------------------------------------------------------
def test_trigger_form_cannot_rewrite_the_gate_or_read_outside_data(tmp_path):
    """Original failure: overrides={"promote": {"primary_metric": "auc", "guardrails": {}}}
    got a weaker model promoted, and data paths there pointed outside the project."""
    sys.path.insert(0, str(ROOT / "dags"))
    from _common import overrides_from_params

    from genre_tasks import config

    base = config.load_params(ROOT / "params.yaml")
    form = {"overrides": {"promote": {"primary_metric": "auc", "guardrails": {}}}}
    with pytest.raises(config.ParamsError) as err:
        config.apply_overrides(base, overrides_from_params(form), ROOT, "trigger form")
    assert "promote.primary_metric='auc'" in str(err.value) and "committed params.yaml" in str(err.value)
    for payload in ({"validate": {"rating_max": 1e9}}, {"evaluate": {"baselines": ["random"]}},
                    {"evaluate": {"ease_lambda": [1e12]}}, {"promote": {"min_effect": 0.0}},
                    {"ingest": {"tabular": {"items": "/etc/passwd"}}},
                    {"ingest": {"mind": {"news": "../../../etc/hosts"}}},
                    {"feedback": {"incoming": "/tmp"}}, {"embed": {"model_path": "/root"}}):
        with pytest.raises(config.ParamsError, match="refused"):
            config.apply_overrides(base, payload, ROOT, "trigger form")
    # allowed: run-size knobs, data paths inside data/, the committed value itself, the escape hatch
    ok = config.apply_overrides(base, overrides_from_params(
        {"epochs": 2, "max_users": 50, "force_promote": True,
         "overrides": {"promote": {"min_effect": base["promote"]["min_effect"]},
                       "ingest": {"tabular": {"items": "mine/items.csv"}}}}), ROOT, "trigger form")
    assert ok["train"]["epochs"] == 2 and ok["promote"]["force"] is True
    # an ad-hoc override file is guarded too; the committed configs/ files are not
    evil = tmp_path / "evil.yaml"
    evil.write_text(yaml.safe_dump({"promote": {"guardrails": {}}}))
    with pytest.raises(config.ParamsError, match="override file"):
        config.load_params(ROOT / "params.yaml", [evil])
    assert config.load_params(ROOT / "params.yaml", [ROOT / "configs" / "tiny.yaml"])["ingest"]["max_users"]


def test_the_training_dag_applies_trigger_form_values_through_the_guard(monkeypatch):
    """The DAG's params snapshot (genre_tasks.registry.workspace.effective_params) is where trigger-form
    values enter: the same payload is refused there."""
    from genre_tasks import config
    from genre_tasks.registry import workspace as W

    monkeypatch.delenv("GENRE_PARAMS_OVERRIDE", raising=False)
    with pytest.raises(config.ParamsError, match="trigger form: refused"):
        W.effective_params(ROOT, {"promote": {"primary_metric": "auc", "guardrails": {}}})
    assert W.effective_params(ROOT, {"train": {"epochs": 2}})["train"]["epochs"] == 2
    assert "W.effective_params(" in (ROOT / "dags" / "genre_training.py").read_text()


# --- one version per model -----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_behaviour_change_with_identical_weights_is_a_new_version(project, model_name):
    """Original failure: train.no_history_fallback changed, model.pt byte-identical, promote
    reused the old version so the change was never deployed."""
    first = promote(project, model_name)
    add_variant(project, no_history_fallback="genre_prior")
    assert (project.model_dir / "content_v2" / "model.pt").read_bytes() == \
        (project.model_dir / "content" / "model.pt").read_bytes()
    second = promote(project, model_name)
    assert second["version"] != first["version"] and second["content_key"] != first["content_key"]
    assert promote(project, model_name)["version"] == second["version"]  # and idempotent


@pytest.mark.slow
def test_a_kill_right_after_registration_finishes_the_same_version(project, model_name, monkeypatch):
    """Original failure: a kill right after register_model made the re-run register a second
    version (the look-up needed a tag registration had not set yet)."""
    from mlflow import MlflowClient

    real = MlflowClient.create_model_version

    def register_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt("killed right after the version was created")

    monkeypatch.setattr(MlflowClient, "create_model_version", register_then_die)
    with pytest.raises(KeyboardInterrupt):
        promote(project, model_name)
    monkeypatch.setattr(MlflowClient, "create_model_version", real)
    done = promote(project, model_name)
    cl, aliases = registry(model_name, project)
    assert [str(mv.version) for mv in cl.search_model_versions(f"name='{model_name}'")] == ["1"]
    assert done["decision"] == "promoted" and aliases["champion"] == 1


@pytest.mark.slow
def test_concurrent_promotes_register_one_version(project, model_name, tracking_env, tmp_path):
    """Original failure: two `genre promote` at once registered two versions of one model,
    both tagged promoted."""
    params = make_params(model_name)
    (project.root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tracking_env}"}
    cmd = [sys.executable, "-m", "genre_tasks.cli", "--root", str(project.root), "--params",
           str(project.root / "params.yaml"), "promote"]
    procs = [subprocess.Popen(cmd, env=env, cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    cl, aliases = registry(model_name, project)
    versions = cl.search_model_versions(f"name='{model_name}'")
    assert len(versions) == 1 and aliases["champion"] == 1
    decisions = sorted('"decision": "promoted"' in o for o in outs)
    assert decisions == [False, True], outs  # the second one found it already champion: unchanged
    assert any('"decision": "unchanged"' in o for o in outs)


@pytest.mark.slow
def test_stale_bundle_folders_are_swept(project, model_name):
    stale = project.root / ".cache" / "promote" / "bundle-killed"
    stale.mkdir(parents=True)
    (stale / "vectors.npy").write_bytes(b"x" * 1000)
    promote(project, model_name)
    assert list((project.root / ".cache" / "promote").iterdir()) == []


# --- the tracking store ----------------------------------------------------------------------------------
def test_the_tracking_store_is_created_once_explicitly_and_never_half_made(tmp_path, monkeypatch):
    from genre_tasks.registry import tracking_store

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    paths = S.Paths(tmp_path)
    with pytest.raises(StageError, match="genre tracking-init"):
        tracking_store.client(paths)  # a stage never creates it lazily
    assert not db.exists()
    # half-made: tables but no schema version (what a kill mid-migration left)
    con = sqlite3.connect(db)
    con.execute("create table experiments (experiment_id integer)")
    con.commit()
    con.close()
    with pytest.raises(StageError, match=r"half-made.*genre tracking-init"):
        tracking_store.require_store(paths)
    assert "re-created" in tracking_store.init_store(paths)
    assert list(tmp_path.glob("mlflow.db.broken-*"))
    tracking_store.require_store(paths)
    assert tracking_store.init_store(paths).endswith("ready")
    assert tracking_store.client(paths).search_experiments()
    # the "usable" verdict is kept per process for this file only: a file put in its place
    # (another inode) is checked again
    db.rename(tmp_path / "good.db")
    sqlite3.connect(db).execute("create table experiments (experiment_id integer)").connection.commit()
    with pytest.raises(StageError, match="half-made"):
        tracking_store.require_store(paths)


@pytest.mark.slow
def test_a_kill_during_store_creation_leaves_no_half_made_store(tmp_path):
    """Original failure: a kill while MLflow created mlflow.db left it unusable for good."""
    import signal
    import time

    from genre_tasks.registry import tracking_store

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "genre_tasks.cli", "--root", str(tmp_path), "tracking-init"]
    for delay in (1.5, 2.5, 3.5):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        db = tmp_path / "mlflow.db"
        assert not db.exists() or tracking_store._schema_state(db) == "ok"
        (db.unlink() if db.exists() else None)
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    assert tracking_store._schema_state(tmp_path / "mlflow.db") == "ok"
    assert not list(tmp_path.glob(".mlflow.db.init-*"))


# --- the ease strategy: the best model of a run can be registered ----------------------------------
@pytest.mark.slow
def test_ease_is_a_registrable_strategy_judged_against_the_other_baselines(project, model_name):
    """EASE trained as a strategy scores exactly like the EASE baseline with the same lambda,
    serves from its bundle like the two-tower models, and the gate compares it with the best
    *other* baseline (it cannot beat itself) while the floor still covers every baseline."""
    from genre_tasks.models import baselines
    from genre_tasks.evaluation import evaluate
    from genre_tasks.evaluation import protocol as evaluation
    from genre_tasks.models import linear
    from genre_tasks.registry import serving
    from genre_tasks.models import train
    from genre_tasks.models import views as D

    from test_promote import TINY_TRAIN

    p = train.TrainParams(**{**TINY_TRAIN, "strategies": ("content", "ease"), "ease_lambda": (10.0, 100.0)})
    train.run(p, project)
    rec = train.load_recommender(project.model_dir / "ease")
    assert isinstance(rec, linear.EaseRecommender) and rec.lam in (10.0, 100.0)
    fit, ev = D.Dataset.load(project).phase("test")
    base = baselines.EASE(rec.lam).fit(fit)
    hist = [fit.histories[u] for u in ev.users[:20]]
    np.testing.assert_allclose(rec.score(hist, fit), base.score(hist, fit), rtol=1e-6)
    # registered as the selected model: the gate's reference leaves the EASE baseline out
    io.write_json({"strategy": "ease", "selection_metric": "ndcg@10", "valid_ndcg@10": {}},
                  project.model_dir / "selected.json")
    from genre_tasks import manifests

    manifests.write(project, "train", [project.root / r for r in manifests.reads(project, "train")],
                    [project.model_dir])
    evaluate.run(evaluate.EvaluateParams(baselines=("random", "mostpop", "ease"), ease_lambda=(10.0, 100.0)),
                 project)
    res = promote(project, model_name)
    assert res["best_baseline"] == "MostPop" and res["compared_against"] == "MostPop (baseline)"
    assert res["decision"] == "promoted"
    served = serving.load(f"models:/{model_name}@champion")
    assert isinstance(served.recommender, linear.EaseRecommender)
    out = served.predict(None, __import__("pandas").DataFrame({"history": [["m0", "m6"]], "k": [3]}))
    assert len(out["item_ids"][0]) == 3 and "m0" not in out["item_ids"][0]
    again = evaluation.evaluate_recommender(__import__("genre_tasks.registry.promote", fromlist=["_Named"])._Named(served, "c"),
                                            fit, ev, 42)
    assert abs(again.metrics["ndcg@10"] - res["challenger"]) < 1e-9


@pytest.mark.slow
def test_a_model_version_carries_the_data_its_run_trained_on_not_later_files(project, model_name):
    """Original failure: a feedback run landed between train and promote, and the version was
    tagged with the store hash that already included the new batch (read from dvc.lock at
    promote time)."""
    from genre_tasks import manifests

    store = project.root / "data" / "source" / "feedback" / "store.csv"
    raw = project.root / "data" / "raw" / "interactions.parquet"
    store.parent.mkdir(parents=True)
    store.write_text("user_id,item_id,timestamp,rating\nu1,m1,1,5\n")
    raw.parent.mkdir(parents=True)
    raw.write_bytes(b"raw interactions as ingested")
    # the upstream records of the run: ingest read the store up to W11, validate read raw
    manifests.write(project, "ingest", [store], [raw])
    manifests.write(project, "validate", [raw], [project.validation_summary])
    trained_store_md5 = io.file_md5(store)
    # a feedback run lands (W12) and dvc.lock records the new store, before promote runs
    with store.open("a") as f:
        f.write("u2,m2,2,4\n")
    (project.root / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  source:\n    cmd: genre source\n    outs:\n"
        f"    - path: data/source\n      hash: md5\n      md5: {io.file_md5(store)}.dir\n      size: 1\n")
    res = promote(project, model_name)
    from genre_tasks.registry import tracking_store

    mv = tracking_store.client(project).get_model_version(model_name, str(res["version"]))
    assert mv.tags["data.data/source/feedback/store.csv"] == trained_store_md5 != io.file_md5(store)
    assert "data.data/source" not in mv.tags  # nothing from dvc.lock written after the run
    assert mv.tags["data.data/processed/interactions.parquet"] == io.file_md5(project.interactions)
    run = tracking_store.client(project).get_run(res["run_id"])
    assert run.data.tags["data.data/source/feedback/store.csv"] == trained_store_md5


# --- the artifact store is not trusted ---------------------------------------------------------
@pytest.mark.slow
def test_a_file_swapped_in_the_artifact_store_is_refused_before_its_code_runs(project, model_name, tmp_path):
    """Registration records a sha256 of the version's files as a version tag (in the registry's
    database); loading re-hashes the downloaded files first. A model file or a shipped source
    file swapped in the artifact store afterwards is refused, and the swapped code never runs."""
    from urllib.parse import urlparse

    from genre_tasks.registry import recommend, serving, tracking_store

    promote(project, model_name, force=True, reason="test: a champion to tamper with")
    cl = tracking_store.client(project)
    mv = cl.get_model_version_by_alias(model_name, "champion")
    recorded = mv.tags[serving.ARTIFACTS_TAG]
    assert len(recorded) == 64
    model = serving.load(f"models:/{model_name}@champion", cl)  # untouched: loads and recommends
    assert len(model.recommend([np.array([0, 1])], [5])[0][0]) == 5

    store = Path(urlparse(cl.get_model_version_download_uri(model_name, mv.version)).path)
    shipped = next(store.rglob("registry/serving.py"))  # the code that runs at load
    marker = tmp_path / "swapped-code-ran"
    original = shipped.read_bytes()
    shipped.write_bytes(original + f"\nopen({str(marker)!r}, 'w').write('ran')\n".encode())
    with pytest.raises(serving.ArtifactsTampered, match="refusing to load"):
        serving.load(f"models:/{model_name}@champion", cl)
    with pytest.raises(serving.ArtifactsTampered):
        recommend.load_champion(project, model_name)
    assert not marker.exists()

    shipped.write_bytes(original)  # restored: accepted again; now a weight file is swapped
    serving.load(f"models:/{model_name}/{mv.version}", cl)
    weights = next(p for p in store.rglob("*") if p.is_file() and p.suffix in (".pt", ".npy"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(serving.ArtifactsTampered, match=recorded):
        serving.load(f"models:/{model_name}/{mv.version}", cl)
    # a version with no recorded digest is refused too (never run unverified)
    cl.delete_model_version_tag(model_name, mv.version, serving.ARTIFACTS_TAG)
    with pytest.raises(serving.ArtifactsTampered, match="no genre.artifacts_sha256"):
        serving.load(f"models:/{model_name}/{mv.version}", cl)
