"""evaluation + the evaluate stage on tiny synthetic data (a fake train module stands in for
genre_tasks.models.train, so these tests do not depend on the trained models)."""
from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from genre_tasks.models import baselines as B
from genre_tasks import config, io
from genre_tasks.models import views as D
from genre_tasks.evaluation import protocol as E
from genre_tasks import schema as S
from genre_tasks.errors import StageError
from genre_tasks.evaluation.evaluate import EvaluateParams, comparison_table, main
from genre_tasks.data.preprocess import PreprocessParams, SplitParams, preprocess
from test_baselines import synthetic_dataset, synthetic_raw, synthetic_vectors

ROOT = Path(__file__).resolve().parents[1]
FULL = {"ndcg@10", "recall@10", "recall@20", "mrr", "hr@10"}
IMP = {"auc", "imp_mrr", "imp_ndcg@5", "imp_ndcg@10"}
COLD = {"cold_ndcg@10", "cold_recall@10", "cold_recall@20", "cold_mrr"}


class Oracle:
    """Scores the evaluated targets of each user highest (knows the answers)."""

    name = "Oracle"

    def __init__(self, ev: D.EvalData, fit: D.FitData) -> None:
        self.good = {int(u): t for u, t in zip(ev.users, ev.targets)}
        self.by_hist = {fit.histories[u].tobytes(): int(u) for u in ev.users}

    def fit(self, data):
        return self

    def score(self, histories, data):
        out = np.zeros((len(histories), data.n_items), np.float32)
        for j, h in enumerate(histories):
            u = self.by_hist.get(np.asarray(h).tobytes())
            if u is not None:
                out[j, self.good[u]] = 1.0
        return out


class Broken:
    name = "Broken"

    def __init__(self, shape_off: bool = False) -> None:
        self.shape_off = shape_off

    def fit(self, data):
        return self

    def score(self, histories, data):
        if self.shape_off:
            return np.zeros((len(histories), data.n_items + 1), np.float32)
        return np.full((len(histories), data.n_items), np.nan, np.float32)


@pytest.fixture(scope="module")
def test_phase():
    return synthetic_dataset().phase("test")


def test_params_match_params_yaml():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    p = config.section(EvaluateParams, "evaluate", params)
    assert {f.name for f in dataclasses.fields(EvaluateParams)} == set(params["evaluate"])
    assert p == EvaluateParams()  # the dataclass defaults are params.yaml's values
    with pytest.raises(config.ParamsError, match="unknown"):
        config.section(EvaluateParams, "evaluate", {"evaluate": {"baselines": ["svd"]}})
    with pytest.raises(config.ParamsError):
        config.section(EvaluateParams, "evaluate", {"evaluate": {"ease_lambda": [0.0]}})


def test_metric_names_units_and_an_oracle(test_phase):
    fit, ev = test_phase
    res = E.evaluate_recommender(Oracle(ev, fit), fit, ev, seed=0)
    names = {k for k in res.metrics if not k.endswith("_se") and not k.startswith("n_")}
    assert names == FULL | IMP
    assert res.metrics["n_users"] == len(ev.users) and res.metrics["n_impressions"] == len(ev.impressions)
    # an oracle puts every target on top: perfect full-ranking metrics
    for m in ("ndcg@10", "mrr", "hr@10"):
        assert res.metrics[m] == pytest.approx(1.0)
    assert res.metrics["auc"] == pytest.approx(1.0) and res.metrics["imp_ndcg@10"] == pytest.approx(1.0)
    # per-unit values are aligned with their users
    assert np.array_equal(res.users["ndcg@10"], ev.users)
    assert np.array_equal(res.users["auc"], [u for u, _, _ in ev.impressions])
    frame = res.frame()
    assert set(frame["group"]) == {"full", "impression"}
    assert len(frame) == len(ev.users) + len(ev.impressions)
    assert {"model", "user_idx", "impression", *FULL, *IMP} <= set(frame.columns)


def test_batching_does_not_change_the_numbers(test_phase):
    fit, ev = test_phase
    rec = B.EASE(lam=10.0).fit(fit)
    a = E.evaluate_recommender(rec, fit, ev, seed=3)
    b = E.evaluate_recommender(rec, fit, ev, seed=3, batch_users=7)
    assert a.metrics == b.metrics


def test_broken_scores_are_refused(test_phase):
    fit, ev = test_phase
    with pytest.raises(ValueError, match="NaN"):
        E.evaluate_recommender(Broken(), fit, ev, seed=0)
    with pytest.raises(ValueError, match="expected"):
        E.evaluate_recommender(Broken(shape_off=True), fit, ev, seed=0)


def test_tune_on_valid_and_refit_on_test():
    ds = synthetic_dataset()
    valid, test = ds.phase("valid"), ds.phase("test")

    def make(value):
        return B.Random(seed=0) if value == "random" else B.EASE(lam=10.0)

    best, table = E.tune(make, ["random", "ease"], valid, seed=0)
    assert best == "ease" and [r["value"] for r in table] == ["random", "ease"]
    assert table[1]["score"] > table[0]["score"] and table[0]["metric"] == "ndcg@10"
    rec = E.fit_for_test(make, best, test)
    assert rec.n_items == test[0].n_items
    with pytest.raises(ValueError, match="valid-phase"):
        E.tune(make, ["ease"], test)
    assert E.tune(make, ["ease"], ds)[0] == "ease"  # a Dataset is cut by tune itself


def test_cold_items_metrics_and_tuning_on_cold_ndcg():
    ds = synthetic_dataset(mode="cold_items")
    fit, ev = ds.phase("test")
    assert ev.cold_items is not None and len(ev.cold_users) > 0
    res = E.evaluate_recommender(B.ContentMean().fit(fit), fit, ev, seed=0)
    assert COLD <= set(res.metrics) and res.metrics["n_cold_users"] == len(ev.cold_users)
    assert np.array_equal(res.users["cold_ndcg@10"], ev.cold_users)
    # collaborative models never saw the cold items; the content model can rank them
    ease = E.evaluate_recommender(B.EASE(lam=10.0).fit(fit), fit, ev, seed=0)
    assert res.metrics["cold_ndcg@10"] > ease.metrics["cold_ndcg@10"]

    def make(value):
        return B.ContentMean() if value == "content" else B.EASE(lam=10.0)

    best, table = E.tune(make, ["ease", "content"], ds, seed=0)
    assert best == "content" and table[0]["metric"] == "cold_ndcg@10"


def test_comparison_table_marks_the_best_and_the_selected_model():
    models = {
        "hybrid": {"ndcg@10": 0.2, "ndcg@10_se": 0.01, "recall@10": 0.1, "auc": 0.7, "n_users": 10,
                   "n_impressions": 8},
        "EASE": {"ndcg@10": 0.1, "ndcg@10_se": 0.02, "recall@10": 0.3, "auc": float("nan"), "n_users": 10,
                 "n_impressions": 8},
    }
    md = comparison_table(models, selected="hybrid")
    lines = md.splitlines()
    assert lines[0].startswith("| model | nDCG@10 ± se | Recall@10 |") and "cold" not in lines[0]
    assert "hybrid (selected)" in lines[2] and "**0.2000** ± 0.0100" in lines[2]
    assert "**0.3000**" in lines[3] and "–" in lines[3]
    models["EASE"]["cold_ndcg@10"] = 0.05
    assert "cold nDCG@10 ± se" in comparison_table(models).splitlines()[0]


# --- the stage ---------------------------------------------------------------------------------

def write_project(root: Path, mode: str = "user_temporal", strategies=("collab", "content"),
                  selected: str | None = "collab") -> S.Paths:
    paths = S.Paths(root)
    items, inter = synthetic_raw()
    items, inter, hist, stats = preprocess(items, inter, PreprocessParams(split=SplitParams(mode=mode)))
    io.write_parquet(items, paths.items)
    io.write_parquet(inter, paths.interactions)
    io.write_parquet(hist, paths.histories)
    io.write_json(stats, paths.split_info)
    io.save_npy(synthetic_vectors(items), paths.vectors)
    io.write_parquet(items[[S.ITEM_ID, S.ITEM_IDX]], paths.vector_index)
    for name in strategies:
        (paths.model_dir / name).mkdir(parents=True)
        (paths.model_dir / name / "kind.txt").write_text("itemknn" if name == "collab" else "content")
    if selected:
        io.write_json({"strategy": selected}, paths.model_dir / "selected.json")
    return paths


@pytest.fixture
def fake_train(monkeypatch):
    """A stand-in genre_tasks.models.train whose load_recommender fits a baseline on the test phase."""
    module = types.ModuleType("genre_tasks.models.train")

    def load_recommender(model_dir: Path):
        paths = S.Paths(Path(model_dir).parents[2])
        fit, _ = D.Dataset.load(paths).phase("test")
        kind = (Path(model_dir) / "kind.txt").read_text()
        return (B.ItemKNN(k=10) if kind == "itemknn" else B.ContentMean()).fit(fit)

    module.load_recommender = load_recommender
    monkeypatch.setitem(sys.modules, "genre_tasks.models.train", module)
    return module


PARAMS = {"evaluate": {"seed": 7, "baselines": ["random", "mostpop", "itemknn", "ease", "content"],
                       "itemknn_k": [5, 20], "ease_lambda": [10.0, 100.0]}}


def test_stage_writes_all_outputs_and_is_deterministic(tmp_path, fake_train):
    runs = []
    for name in ("a", "b"):
        paths = write_project(tmp_path / name)
        summary = main(PARAMS, paths)
        runs.append(paths)
    assert summary["selected"] == "collab" and summary["split"] == "user_temporal"
    paths = runs[0]
    report = io.read_json(paths.metrics("evaluate"))
    assert report["split"] == "user_temporal" and report["selected"] == "collab"
    assert set(report["models"]) == {"collab", "content", "Random", "MostPop", "ItemKNN", "EASE", "ContentMean"}
    assert report["kinds"]["collab"] == "strategy" and report["kinds"]["EASE"] == "baseline"
    assert report["chosen_hyperparameters"]["ItemKNN"]["k"] in (5, 20)
    assert report["chosen_hyperparameters"]["EASE"]["lambda"] in (10.0, 100.0)
    for m in report["models"].values():
        assert (FULL | IMP) <= set(m) and m["n_users"] > 0
    # the collab strategy (ItemKNN k=10 here) beats Random
    assert report["models"]["collab"]["ndcg@10"] > report["models"]["Random"]["ndcg@10"]

    eval_dir = paths.root / "data" / "eval"
    md = (eval_dir / "comparison.md").read_text()
    assert "collab (selected)" in md and "| EASE |" in md
    per_user = pd.read_parquet(eval_dir / "per_user.parquet")
    assert set(per_user["model"]) == set(report["models"])
    assert {"model", "group", "user_idx", "impression", *FULL, *IMP} <= set(per_user.columns)
    plots = pd.read_csv(paths.plots_dir / "comparison.csv")
    assert set(plots["model"]) == set(report["models"]) and "ndcg@10" in plots
    assert (eval_dir / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((eval_dir / "tuning.json").read_text())["grids"]["EASE"]

    # two clean runs: identical numbers
    other = runs[1]
    assert paths.metrics("evaluate").read_text() == other.metrics("evaluate").read_text()
    pd.testing.assert_frame_equal(per_user, pd.read_parquet(other.root / "data" / "eval" / "per_user.parquet"))
    assert (eval_dir / "comparison.md").read_text() == (other.root / "data" / "eval" / "comparison.md").read_text()


def test_stage_cold_items_split(tmp_path, fake_train):
    paths = write_project(tmp_path, mode="cold_items", strategies=("content",), selected="content")
    params = {"evaluate": {**PARAMS["evaluate"], "baselines": ["random", "ease", "content"]}}
    main(params, paths)
    report = io.read_json(paths.metrics("evaluate"))
    assert report["split"] == "cold_items"
    assert COLD <= set(report["models"]["ContentMean"])
    assert "valid_cold_ndcg@10" in report["chosen_hyperparameters"]["EASE"]
    assert "cold nDCG@10" in (paths.root / "data" / "eval" / "comparison.md").read_text()


@pytest.mark.parametrize("name,limit", [("EASE", "ease_max_items"), ("ItemKNN", "itemknn_max_items")])
def test_quadratic_baselines_are_skipped_above_their_item_limit(tmp_path, fake_train, caplog, name, limit):
    paths = write_project(tmp_path)
    n_items = len(pd.read_parquet(paths.items))
    params = {"evaluate": {**PARAMS["evaluate"], limit: n_items - 1}}
    with caplog.at_level("WARNING"):
        summary = main(params, paths)
    report = io.read_json(paths.metrics("evaluate"))
    assert name not in report["models"] and name not in report["chosen_hyperparameters"]
    assert f"{n_items:,} items > evaluate.{limit}={n_items - 1:,}" in report["skipped_baselines"][name]
    assert list(report["skipped_baselines"]) == [name]  # the other baseline still runs
    assert summary["skipped_baselines"] == report["skipped_baselines"]
    assert any(name in r.message and "SKIPPED" in r.message for r in caplog.records)
    # at the limit it runs
    params["evaluate"][limit] = n_items
    at = write_project(tmp_path / "at")
    main(params, at)
    report = io.read_json(at.metrics("evaluate"))
    assert name in report["models"] and report["skipped_baselines"] == {}
    with pytest.raises(config.ParamsError, match=limit):
        main({"evaluate": {**PARAMS["evaluate"], limit: 0}}, write_project(tmp_path / "bad"))


def test_evaluation_users_are_sampled_and_the_sample_is_stated(tmp_path, fake_train):
    full = write_project(tmp_path / "full")
    main(PARAMS, full)
    everyone = io.read_json(full.metrics("evaluate"))
    assert everyone["eval_users"]["test"]["sampled"] is False
    total = everyone["eval_users"]["test"]["users_total"]
    n = max(2, total // 3)
    runs = []
    for name in ("a", "b"):
        paths = write_project(tmp_path / name)
        main({"evaluate": {**PARAMS["evaluate"], "max_users": n}}, paths)
        runs.append(io.read_json(paths.metrics("evaluate")))
    report = runs[0]
    assert report["eval_users"]["test"] == {"users_total": total, "users": n, "sampled": True, "seed": 7}
    assert report["eval_users"]["max_users"] == n and report["eval_users"]["valid"]["users"] <= n
    for m in report["models"].values():  # every model on the same sample, at most n users
        assert 0 < m["n_users"] <= n
    assert runs[0] == runs[1]  # seeded: the same sample twice
    per_user = pd.read_parquet(tmp_path / "a" / "data" / "eval" / "per_user.parquet")
    assert per_user["user_idx"].nunique() <= n
    with pytest.raises(config.ParamsError, match="max_users"):
        main({"evaluate": {**PARAMS["evaluate"], "max_users": 0}}, write_project(tmp_path / "bad"))


def test_stage_without_models_and_with_bad_inputs(tmp_path, fake_train):
    paths = write_project(tmp_path / "none", strategies=(), selected=None)
    params = {"evaluate": {**PARAMS["evaluate"], "baselines": ["mostpop"]}}
    summary = main(params, paths)
    assert summary["selected"] is None and set(io.read_json(paths.metrics("evaluate"))["models"]) == {"MostPop"}

    paths = write_project(tmp_path / "missing", strategies=("collab",), selected="hybrid")
    with pytest.raises(StageError, match="hybrid"):
        main(params, paths)
    with pytest.raises(StageError, match="missing"):
        main(params, S.Paths(tmp_path / "empty"))


def _impressions_by_definition(ds: D.Dataset, phase: str, fit: D.FitData) -> list:
    """The impressions as defined: rows of ``phase`` whose user has a history, one impression per
    impression id (else per user) in key order, an item shown twice kept once with its last label
    (row order otherwise kept), only impressions with both labels."""
    rows = ds.interactions[ds.interactions[S.SPLIT] == phase]
    rows = rows[[len(fit.histories[u]) > 0 for u in rows[S.USER_IDX]]]
    key = S.IMPRESSION_ID if rows[S.IMPRESSION_ID].notna().any() else S.USER_IDX
    rows = rows[rows[key].notna()]
    out = []
    for _, g in rows.groupby(key, sort=True):
        g = g.drop_duplicates(S.ITEM_IDX, keep="last")
        labels = g[S.POSITIVE].to_numpy().astype(np.int8)
        if 0 < labels.sum() < len(labels):
            out.append((int(g[S.USER_IDX].iloc[0]), g[S.ITEM_IDX].to_numpy(np.int64), labels))
    return out


@pytest.mark.parametrize("with_ids", [False, True])
def test_impressions_follow_their_definition(with_ids):
    ds = synthetic_dataset()
    inter = ds.interactions.copy()
    test = inter.index[inter[S.SPLIT] == "test"]
    # an item shown twice to a user, first liked then not: its last label counts
    dup = inter.loc[[test[0]]].assign(**{S.POSITIVE: ~inter.loc[test[0], S.POSITIVE]})
    inter = pd.concat([inter, dup], ignore_index=True)
    if with_ids:  # MIND-like: two impressions per user, ids not in user order
        test = inter.index[inter[S.SPLIT] == "test"]
        inter[S.IMPRESSION_ID] = None
        inter.loc[test, S.IMPRESSION_ID] = [f"imp-{(9 - u % 10)}-{i % 2}"
                                            for i, u in enumerate(inter.loc[test, S.USER_IDX])]
    ds = dataclasses.replace(ds, interactions=inter)
    fit, ev = ds.phase("test")
    want = _impressions_by_definition(ds, "test", fit)
    assert len(want) > 3 and len(ev.impressions) == len(want)
    for (u, items, labels), (wu, witems, wlabels) in zip(ev.impressions, want):
        assert u == wu and np.array_equal(items, witems) and np.array_equal(labels, wlabels)
