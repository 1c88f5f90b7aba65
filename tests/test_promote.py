"""promote stage: challenger vs champion (or MostPop) with a paired bootstrap, aliases only.

The project used here is synthetic and tiny but real end to end: processed tables written by
``preprocess.preprocess`` (150 users who each like one of 6 genres, 60 items whose vectors
cluster by genre), a ``content`` model trained by ``train.run`` (good: it learns the genre
clusters), ``collaborative`` models with untrained weights (bad: near-random scores) and the
``evaluate`` stage's outputs. Each test gets its own copy of the project and its own registered
model name in one session-wide sqlite tracking database.

``build_data`` / ``trained_project`` are also used by test_serving.py and test_tracking.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from genre_tasks import io
from genre_tasks import schema as S

ROOT = Path(__file__).resolve().parents[1]
GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]
TINY_TRAIN = dict(strategies=("content",), epochs=4, patience=2, dim=16, hidden=32, negatives=8,
                  batch_size=64, history_max=20, threads=1)


# --- the synthetic project -------------------------------------------------------------------
def raw_tables(n_users: int = 150, n_items: int = 60, n_hits: int = 4, seed: int = 0):
    """Raw items/interactions: user u likes 8 items of genre u % 6 and 3 of the ``n_hits``
    blockbusters everyone likes (rating 5), dislikes 3 others (rating 2), in a random time
    order. Item vectors cluster by genre (blockbusters form their own cluster). So a content
    model can learn both the genres and the hits, MostPop finds the hits, a random model neither.
    """
    rng = np.random.default_rng(seed)
    n_g = len(GENRES)
    genre_of = [GENRES[j % n_g] for j in range(n_items)] + ["Blockbuster"] * n_hits
    names = [f"{g} movie {j}" for j, g in enumerate(genre_of)]
    items = pd.DataFrame({
        S.ITEM_ID: pd.array([f"m{j}" for j in range(len(names))], dtype="string"),
        S.TITLE: pd.array(names, dtype="string"),
        S.TEXT: pd.array(names, dtype="string"),
        S.GENRES: [[g] for g in genre_of],
    })
    hits = list(range(n_items, n_items + n_hits))
    rows = []
    for u in range(n_users):
        own = [j for j in range(n_items) if j % n_g == u % n_g]
        other = [j for j in range(n_items) if j % n_g != u % n_g]
        picks = [(int(j), 5.0) for j in rng.choice(own, size=8, replace=False)]
        picks += [(int(j), 5.0) for j in rng.choice(hits, size=3, replace=False)]
        picks += [(int(j), 2.0) for j in rng.choice(other, size=3, replace=False)]
        for t, o in enumerate(rng.permutation(len(picks))):
            rows.append((f"u{u}", f"m{picks[o][0]}", 1_000_000 + 100 * t + u, picks[o][1]))
    inter = pd.DataFrame(rows, columns=[S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.RATING])
    inter[S.USER_ID] = inter[S.USER_ID].astype("string")
    inter[S.ITEM_ID] = inter[S.ITEM_ID].astype("string")
    inter[S.LABEL] = pd.array([pd.NA] * len(inter), dtype="Int8")
    inter[S.IMPRESSION_ID] = pd.array([pd.NA] * len(inter), dtype="string")
    centers = rng.normal(size=(n_g + 1, 16))
    cluster = [j % n_g for j in range(n_items)] + [n_g] * n_hits
    vec = centers[cluster] + 0.3 * rng.normal(size=(len(cluster), 16))
    return items, inter, (vec / np.linalg.norm(vec, axis=1, keepdims=True)).astype(np.float32)


def build_data(root: Path) -> S.Paths:
    """data/processed + data/embeddings + a passed validation summary under ``root``."""
    from genre_tasks.data.preprocess import PreprocessParams, preprocess

    paths = S.Paths(root)
    items, inter, vec = raw_tables()
    items, inter, hist, stats = preprocess(items, inter, PreprocessParams())
    io.write_parquet(items, paths.items)
    io.write_parquet(inter, paths.interactions)
    io.write_parquet(hist, paths.histories)
    io.write_json(stats, paths.split_info)
    io.write_json(stats, paths.metrics("preprocess"))
    io.save_npy(vec, paths.vectors)
    io.write_parquet(items[[S.ITEM_ID]], paths.vector_index)
    io.write_json({"success": True, "tables": {}}, paths.validation_summary)
    record_stages(paths)
    return paths


def record_stages(paths: S.Paths) -> None:
    """What the preprocess and embed stages record (data/manifests/) for the files above."""
    from genre_tasks import manifests

    manifests.write(paths, "validate", [], [paths.validation_summary])
    manifests.write(paths, "preprocess", [paths.validation_summary],
                    [paths.items, paths.interactions, paths.histories, paths.split_info])
    manifests.write(paths, "embed", [paths.items], [paths.vectors, paths.vector_index])


def retrain_record(paths: S.Paths) -> None:
    """What a train run followed by an evaluate run leave after data/model/ was changed by
    hand here (a degraded model standing in for a real retrain): the train record of the
    current data/model/ and a fresh evaluate."""
    from genre_tasks import manifests
    from genre_tasks.evaluation import evaluate

    reads = [paths.root / r for r in manifests.reads(paths, "train")]
    manifests.write(paths, "train", reads, [paths.model_dir])
    evaluate.run(evaluate.EvaluateParams(baselines=("random", "mostpop")), paths)


def add_bad_model(paths: S.Paths, seed: int, select: bool = True) -> Path:
    """data/model/bad<seed>/: a collaborative two-tower with untrained (random) weights."""
    from genre_tasks.models import views as D
    from genre_tasks.models import model as M
    from genre_tasks.models.model import fit_model
    from genre_tasks.models.params import TrainParams

    fit, _ = D.Dataset.load(paths).phase("test")
    p = TrainParams(**{**TINY_TRAIN, "strategies": ("collaborative",), "seed": seed})
    rec = fit_model(p, "collaborative", fit, None, epochs=0, show_progress=False).recommender
    d = paths.model_dir / f"bad{seed}"
    d.mkdir(parents=True, exist_ok=True)
    M.save(rec, d)
    io.write_text("epoch,train_loss,valid_ndcg@10,seconds\n", d / "curve.csv")
    if select:
        select_model(paths, d.name)
    retrain_record(paths)
    return d


def select_model(paths: S.Paths, strategy: str, record: bool = False) -> None:
    io.write_json({"strategy": strategy, "selection_metric": "ndcg@10", "valid_ndcg@10": {}},
                  paths.model_dir / "selected.json")
    if record:
        retrain_record(paths)


_BUILT: dict[str, Path] = {}


def trained_project(base: Path) -> Path:
    """Build (once per session) data + a trained ``content`` model + evaluate outputs."""
    if "project" not in _BUILT:
        from genre_tasks.evaluation import evaluate
        from genre_tasks.models import train

        paths = build_data(base / "trained")
        train.run(train.TrainParams(**TINY_TRAIN), paths)
        evaluate.run(evaluate.EvaluateParams(baselines=("random", "mostpop")), paths)
        _BUILT["project"] = paths.root
    return _BUILT["project"]


def params_dict() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture(scope="session")
def mlflow_db(tmp_path_factory) -> Path:
    """One sqlite database for the session (creating one costs seconds of migrations)."""
    if "db" not in _BUILT:
        _BUILT["db"] = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return _BUILT["db"]


@pytest.fixture
def tracking_env(monkeypatch, mlflow_db):
    """A temp sqlite tracking URI (artifacts beside it) and no inherited run id."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_db}")
    monkeypatch.delenv("GENRE_MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("GENRE_PARAMS_OVERRIDE", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    from genre_tasks.registry import tracking_store

    tracking_store.init_store(S.Paths("."))  # what make setup / the DAG's first task do
    yield mlflow_db
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # leave no global URI behind for other tests


@pytest.fixture
def project(tmp_path, tmp_path_factory, tracking_env) -> S.Paths:
    """A private copy of the trained project."""
    src = trained_project(tmp_path_factory.getbasetemp())
    dst = tmp_path / "project"
    shutil.copytree(src, dst)
    return S.Paths(dst)


_NAMES = iter(range(1_000_000))


@pytest.fixture
def model_name() -> str:
    return f"genre-test-{next(_NAMES)}"


def make_params(name: str, **overrides) -> dict:
    """params.yaml with promote.model_name = ``name`` (and fewer bootstrap samples: faster)."""
    params = params_dict()
    params["promote"] = {**params["promote"], "model_name": name, "bootstrap_samples": 500, **overrides}
    return params


def promote(paths: S.Paths, name: str, force: bool = False, reason: str | None = None,
            **overrides) -> dict:
    from genre_tasks import config
    from genre_tasks.registry.gate import PromoteParams
    from genre_tasks.registry.promote import run

    params = make_params(name, **overrides)
    p = config.section(PromoteParams, "promote", params)
    return run(p, paths, force=force, reason=reason, params=params)


def registry(name: str, paths: S.Paths):
    from genre_tasks.registry import tracking_store

    cl = tracking_store.client(paths)
    rm = cl.get_registered_model(name)
    return cl, {a: int(v) for a, v in rm.aliases.items()}


# --- the rule (pure) ---------------------------------------------------------------------------
class FakeResult:
    def __init__(self, values: np.ndarray, extra: dict | None = None) -> None:
        self.per_user = {"ndcg@10": np.asarray(values, float)}
        self.users = {"ndcg@10": np.arange(len(values))}
        self.metrics = {"ndcg@10": float(np.mean(values)), **(extra or {})}


def rule_params(**kw):
    from genre_tasks.registry.gate import PromoteParams

    base = dict(min_effect=0.002, confidence=0.95, bootstrap_samples=1000, seed=7,
                guardrails={"auc": 0.01, "cold_ndcg@10": 0.02})
    return PromoteParams(**{**base, **kw})


def test_params_match_params_yaml_and_force_is_not_a_param():
    from genre_tasks import config
    from genre_tasks.registry.gate import PromoteParams

    section = params_dict()["promote"]
    assert "force" not in section
    p = config.section(PromoteParams, "promote", params_dict())
    assert (p.model_name, p.primary_metric, p.force) == (section["model_name"], section["primary_metric"], False)
    assert p.guardrails == section["guardrails"]
    with pytest.raises(config.ParamsError):
        config.from_dict(PromoteParams, {**section, "confidence": 1.5}, "promote")


def test_paired_bootstrap_is_seeded_and_bounds_the_gain():
    from genre_tasks.registry.gate import paired_bootstrap

    rng = np.random.default_rng(0)
    b = rng.random(300)
    a = b + 0.05 + 0.01 * rng.standard_normal(300)
    r1 = paired_bootstrap(a, b, 500, 1, 0.95)
    assert r1 == paired_bootstrap(a, b, 500, 1, 0.95)
    gain, lo, hi, p, n = r1
    assert n == 300 and lo < gain < hi and lo > 0 and p < 0.01
    # NaN units are dropped pairwise
    a2 = a.copy()
    a2[:10] = np.nan
    assert paired_bootstrap(a2, b, 200, 1, 0.95)[4] == 290


def test_decide_promotes_only_a_significant_gain_within_guardrails():
    from genre_tasks.registry.gate import decide

    rng = np.random.default_rng(1)
    ref = rng.random(400)
    better = np.clip(ref + 0.05, 0, None)
    noisy = ref + rng.normal(0, 0.3, 400)  # mean gain ~0, huge variance
    weak = {"MostPop": FakeResult(ref * 0.5)}  # a baseline everyone beats
    p = rule_params()

    d = decide(FakeResult(better, {"auc": 0.80}), {"MostPop": FakeResult(ref, {"auc": 0.80})}, p)
    assert d.decision == "promoted" and d.promote and d.primary.ci_lower > 0
    assert d.reference == "MostPop (baseline)" and d.vs_champion is None

    d = decide(FakeResult(noisy), weak, p, FakeResult(ref), "champion v1")
    assert d.decision == "rejected" and not d.promote and d.reasons and d.reference == "champion v1"

    # tiny but certain gain: below min_effect
    d = decide(FakeResult(ref + 0.001), weak, p, FakeResult(ref), "champion v1")
    assert d.decision == "rejected" and any("min_effect" in r for r in d.reasons)

    # guardrail: auc drops by more than its tolerance; cold_ndcg@10 absent -> not checked
    d = decide(FakeResult(better, {"auc": 0.70}), weak, p, FakeResult(ref, {"auc": 0.80}), "champion v1")
    assert d.decision == "rejected" and list(d.guardrails) == ["auc"]
    assert any("guardrail auc" in r for r in d.reasons)
    # against a baseline (no champion yet) the guardrails do not apply
    d = decide(FakeResult(better, {"auc": 0.70}), {"MostPop": FakeResult(ref, {"auc": 0.80})}, p)
    assert d.decision == "promoted" and d.guardrails == {}

    d = decide(FakeResult(ref - 0.1), {"MostPop": FakeResult(ref * 0.2)}, p, FakeResult(ref), "champion v1",
               force=True)
    assert d.decision == "forced" and d.promote


def test_the_reference_is_the_best_of_the_run_and_the_floor_holds_even_when_forced():
    """A challenger that beats the champion but loses to a baseline of the same run is never
    promoted (the failure: a model below EASE was promoted because only MostPop was checked)."""
    from genre_tasks.registry.gate import decide

    rng = np.random.default_rng(2)
    champ = rng.random(500) * 0.5
    chal = champ + 0.05  # clearly better than the champion ...
    baselines = {"MostPop": FakeResult(champ - 0.05), "EASE": FakeResult(chal + 0.05),
                 "Random": FakeResult(champ * 0.1)}  # ... but clearly below EASE
    p = rule_params()
    d = decide(FakeResult(chal), baselines, p, FakeResult(champ), "champion v1")
    assert d.decision == "rejected" and d.reference == "EASE (baseline)" and d.best_baseline == "EASE"
    assert d.vs_champion.gain > 0.04 and d.vs_baseline.ci_upper < 0
    assert any("best model of this run is a baseline: EASE" in r for r in d.reasons)
    forced = decide(FakeResult(chal), baselines, p, FakeResult(champ), "champion v1", force=True)
    assert forced.decision == "rejected" and not forced.promote
    assert forced.reasons[0].startswith("force refused: significantly worse than EASE")
    # empty registry: same story
    assert decide(FakeResult(chal), baselines, p).decision == "rejected"
    # better than every baseline and the champion: promoted, both comparisons recorded
    d = decide(FakeResult(chal + 0.2), baselines, p, FakeResult(champ), "champion v1")
    assert d.decision == "promoted" and d.reference == "EASE (baseline)"
    assert d.vs_champion.gain > 0 and d.vs_baseline.gain > 0


# --- the stage on a real (tiny) registry ---------------------------------------------------------
@pytest.mark.slow
def test_first_challenger_must_beat_the_best_baseline(project, model_name):
    add_bad_model(project, seed=1)
    bad = promote(project, model_name)
    assert bad["decision"] == "rejected" and bad["compared_against"] == "MostPop (baseline)"
    assert bad["best_baseline"] == "MostPop"
    cl, aliases = registry(model_name, project)
    assert aliases == {"challenger": bad["version"]}  # no champion

    select_model(project, "content", record=True)
    good = promote(project, model_name)
    assert good["decision"] == "promoted" and good["compared_against"] == "MostPop (baseline)"
    assert good["gain"] >= 0.002 and good["ci_lower"] > 0
    cl, aliases = registry(model_name, project)
    assert aliases == {"champion": good["version"], "challenger": good["version"]}
    written = io.read_json(project.metrics("promote"))
    assert written["decision"] == "promoted" and written["version"] == good["version"]


@pytest.mark.slow
def test_worse_challenger_is_rejected_and_champion_unchanged(project, model_name, capsys):
    champ = promote(project, model_name)
    assert champ["decision"] == "promoted"
    add_bad_model(project, seed=2)
    res = promote(project, model_name)
    assert res["decision"] == "rejected" and res["compared_against"] == f"champion v{champ['version']}"
    assert res["gain"] < 0 and res["champion_version"] == champ["version"]
    cl, aliases = registry(model_name, project)
    assert aliases["champion"] == champ["version"] and aliases["challenger"] == res["version"]
    assert "previous_champion" not in aliases
    mv = cl.get_model_version(model_name, res["version"])
    assert mv.tags["decision"] == "rejected"
    assert mv.tags["champion_version_before"] == str(champ["version"])
    assert float(mv.tags["gain"]) < 0 and "ci_lower" in mv.tags and "p_value" in mv.tags
    assert float(mv.tags["reference.recall_at_10"]) > float(mv.tags["challenger.recall_at_10"])
    assert mv.tags["challenger.n_users"] == mv.tags["reference.n_users"] == mv.tags["n_users"]
    assert "REJECTED" in mv.description and "ndcg@10" in mv.description
    assert "REJECTED" in capsys.readouterr().out


def add_variant(paths: S.Paths, name: str = "content_v2", **params) -> Path:
    """data/model/<name>/: the trained content model with the same weights and other serving
    params in meta.json (e.g. no_history_fallback), selected and recorded."""
    d = paths.model_dir / name
    shutil.copytree(paths.model_dir / "content", d)
    meta = io.read_json(d / "meta.json")
    meta["params"] = {**meta["params"], **params}
    io.write_json(meta, d / "meta.json")
    select_model(paths, name, record=True)
    return d


@pytest.mark.slow
def test_force_needs_a_reason_records_who_and_why_and_never_passes_the_floor(project, model_name, monkeypatch):
    from genre_tasks import config

    champ = promote(project, model_name)
    add_variant(project, no_history_fallback="genre_prior")  # as good as the champion, not better
    assert promote(project, model_name)["decision"] == "rejected"
    monkeypatch.setenv("GENRE_PROMOTE_ACTOR", "alice")
    with pytest.raises(config.ParamsError, match="needs a reason"):
        promote(project, model_name, force=True)
    res = promote(project, model_name, force=True, reason="rollback drill")
    assert res["decision"] == "forced" and res["champion_version"] == res["version"]
    cl, aliases = registry(model_name, project)
    assert aliases["champion"] == res["version"] and aliases["previous_champion"] == champ["version"]
    mv = cl.get_model_version(model_name, res["version"])
    assert mv.tags["decision"] == "forced"
    assert mv.tags["forced_by"] == "alice" and mv.tags["force_reason"] == "rollback drill"
    assert "FORCED" in mv.description and "alice" in mv.description
    # a model significantly worse than the best baseline is not promoted, even when forced
    add_bad_model(project, seed=3)
    bad = promote(project, model_name, force=True, reason="please")
    assert bad["decision"] == "rejected" and bad["reasons"][0].startswith("force refused")
    assert registry(model_name, project)[1]["champion"] == res["version"]


@pytest.mark.slow
def test_failure_while_scoring_leaves_the_registry_untouched(project, model_name, monkeypatch):
    from genre_tasks.evaluation import protocol as evaluation

    champ = promote(project, model_name)
    add_bad_model(project, seed=4)
    cl, before = registry(model_name, project)
    n_versions = len(cl.search_model_versions(f"name='{model_name}'"))

    def boom(*args, **kwargs):
        raise RuntimeError("scoring exploded")

    monkeypatch.setattr(evaluation, "evaluate_recommender", boom)
    with pytest.raises(RuntimeError, match="scoring exploded"):  # even a forced promotion must not half-happen
        promote(project, model_name, force=True, reason="drill")
    cl, aliases = registry(model_name, project)
    assert aliases == before and aliases["champion"] == champ["version"]
    assert len(cl.search_model_versions(f"name='{model_name}'")) == n_versions  # nothing registered
    assert io.read_json(project.metrics("promote"))["version"] == champ["version"]  # not rewritten


@pytest.mark.slow
def test_rerun_reuses_the_version_and_every_version_carries_lineage(project, model_name):
    from genre_tasks import manifests
    from genre_tasks.registry import provenance
    from genre_tasks.registry import promote as P

    first = promote(project, model_name)
    again = promote(project, model_name)
    assert again["version"] == first["version"] and again["decision"] == "unchanged"
    add_bad_model(project, seed=5)
    promote(project, model_name)
    cl, _ = registry(model_name, project)
    versions = cl.search_model_versions(f"name='{model_name}'")
    assert len(versions) == 2
    hashes = manifests.lineage(project, "train")
    for mv in versions:
        t = mv.tags
        assert t["git_commit"] and t["params_hash"] == provenance.params_hash(make_params(model_name))
        assert t["data_hash"] == provenance.combined_hash(hashes)
        assert t["data.data/processed/interactions.parquet"] == io.file_md5(project.interactions)
        assert t["data.data/embeddings/vectors.npy"] == io.file_md5(project.vectors)
        assert len(t["content_key"]) == 64 and t["run_id"] and t["split_mode"] == "user_temporal"
    # the first decision record survives the no-op re-run
    assert cl.get_model_version(model_name, first["version"]).tags["decision"] == "promoted"
    table = P.registry_state(model_name, project)
    assert "| 1 | challenger" not in table and "champion" in table and "rejected" in table
    assert "promoted" in table and "MostPop (baseline)" in table


@pytest.mark.slow
def test_main_entry_point_writes_metrics_and_tags_the_run(project, model_name):
    import mlflow

    from genre_tasks.registry import promote as P

    params = params_dict()
    params["promote"] = {**params["promote"], "model_name": model_name, "bootstrap_samples": 200}
    summary = P.main(params, project)
    assert summary["decision"] == "promoted" and summary["model_name"] == model_name
    record = json.loads(project.metrics("promote").read_text())
    run = mlflow.MlflowClient().get_run(record["run_id"])
    assert run.data.tags["promote.decision"] == "promoted"
    assert run.info.status == "FINISHED"
    assert mlflow.active_run() is None
