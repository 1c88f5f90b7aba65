"""The fusion strategy (EASE + content tower blend), seeds, selection and score parts, on the
tiny clustered synthetic dataset of test_train.py."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from genre_tasks import io
from genre_tasks import schema as S
from genre_tasks.models.views import Dataset

torch = pytest.importorskip("torch")

from genre_tasks.evaluation import evaluate as EV  # noqa: E402
from genre_tasks.evaluation import protocol as E  # noqa: E402
from genre_tasks.models import fusion, linear, train  # noqa: E402
from genre_tasks.models import model as M  # noqa: E402
from test_train import P, copy_processed, write_processed  # noqa: E402


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """The train stage run once with content + ease + fusion and one extra seed."""
    paths, cluster, unrated = write_processed(tmp_path_factory.mktemp("fusion"))
    params = {"train": {**dataclasses.asdict(dataclasses.replace(P, epochs=3, patience=1)),
                        "strategies": ["content", "ease", "fusion"], "extra_seeds": [8],
                        "ease_lambda": [1.0, 10.0], "fusion_weights": [0.0, 0.5, 1.0]}}
    summary = train.main(params, paths)
    return paths, summary, unrated


def test_fusion_needs_its_components():
    from genre_tasks import config

    with pytest.raises(config.ParamsError, match="fusion"):
        config.section(train.TrainParams, "train", {"train": {"strategies": ["content", "fusion"]}})
    with pytest.raises(config.ParamsError, match="extra_seeds"):
        config.section(train.TrainParams, "train", {"train": {"seed": 3, "extra_seeds": [3]}})


def test_stage_trains_seeds_and_selects_on_the_mean(staged):
    paths, summary, _ = staged
    md = paths.model_dir
    for s in ("content", "ease", "fusion"):
        assert train.load_recommender(md / s) is not None
    # extra-seed models of the stochastic strategies only
    assert (md / train.SEEDS_DIR / "content" / "8" / "model.pt").exists()
    assert fusion.is_saved(md / train.SEEDS_DIR / "fusion" / "8")
    assert not (md / train.SEEDS_DIR / "ease").exists()
    sel = io.read_json(md / "selected.json")
    means = {s: r["valid_mean"] for s, r in summary["strategies"].items()}
    assert sel["strategy"] == max(means, key=lambda s: (means[s], -["content", "ease", "fusion"].index(s)))
    assert summary["strategies"]["content"]["seeds"] == [P.seed, 8]
    w = summary["strategies"]["fusion"]["weight"]
    assert w in (0.0, 0.5, 1.0)
    # fusion's grid includes both components (w = 0, w = 1): its valid mean is at least theirs
    assert means["fusion"] >= max(means["ease"], means["content"]) - 1e-9


def test_fusion_endpoints_rank_like_their_components(staged):
    paths, _, unrated = staged
    fit, _ = Dataset.load(paths).phase("test")
    rec = train.load_recommender(paths.model_dir / "fusion")
    h = [fit.histories[u] for u in range(fit.n_users) if len(fit.histories[u])]
    ease, tower = rec.ease.score(h, fit), rec.tower.score(h, fit)
    for w, ref in ((0.0, ease), (1.0, tower)):
        s = fusion.FusionRecommender(rec.ease, rec.tower, w).score(h, fit)
        # same order per user (z-scoring is monotone)
        assert np.array_equal(np.argsort(-s, axis=1, kind="stable"), np.argsort(-ref, axis=1, kind="stable"))
    # items EASE never saw (no interaction) are ranked among themselves by the tower alone
    cold = np.flatnonzero(unrated)
    s = fusion.FusionRecommender(rec.ease, rec.tower, 0.5).score(h, fit)[:, cold]
    assert np.array_equal(np.argsort(-s, axis=1, kind="stable"), np.argsort(-tower[:, cold], axis=1, kind="stable"))
    assert s.std(axis=1).min() > 0


def test_fusion_grid_on_threads_equals_the_serial_grid(staged, monkeypatch):
    """The validation grid's points are evaluated by several threads: the same numbers, in the
    grid's order, as one after the other."""
    paths, _, _ = staged
    fit, ev = Dataset.load(paths).phase("valid")
    rec = train.load_recommender(paths.model_dir / "fusion")
    grid = [(w, v) for w in (0.0, 0.3, 0.7, 1.0) for v in (0.0, 0.2)]
    quality = fusion.quality_prior(fit)[0]
    results = {}
    for threads in (1, 3):
        monkeypatch.setattr(train, "_threads", lambda n=threads: n)
        results[threads] = train.fusion_grid(rec.ease, rec.tower, grid, fit, ev, 0, quality)
    assert len(results[1]) == len(grid)
    assert len({r[1] for r in results[1]}) > 1, "the grid's points differ (a real comparison)"
    np.testing.assert_array_equal(np.array(results[3]), np.array(results[1]))


def test_prior_part_is_one_list_for_everyone(staged):
    paths, _, _ = staged
    fit, _ = Dataset.load(paths).phase("test")
    h = [fit.histories[u] for u in range(5)]
    for s in ("content", "fusion"):
        rec = train.load_recommender(paths.model_dir / s)
        prior = rec.score(h, fit, part="prior")
        assert np.all(prior == prior[:1])
    tower = train.load_recommender(paths.model_dir / "content")
    np.testing.assert_allclose(tower.score(h, fit, part="prior") + tower.score(h, fit, part="personal"),
                               tower.score(h, fit), rtol=1e-4, atol=1e-4)


def test_evaluate_reports_seeds_parts_and_paired_tests(staged):
    paths, _, _ = staged
    summary = EV.run(EV.EvaluateParams(itemknn_k=(5,), ease_lambda=(1.0, 10.0)), paths)
    doc = io.read_json(paths.metrics("evaluate"))
    assert set(doc["seeds"]) == {"content", "fusion"}
    c = doc["seeds"]["content"]
    assert c["seeds"] == [P.seed, 8] and len(c["metrics"]["ndcg@10"]["values"]) == 2
    assert c["metrics"]["ndcg@10"]["values"][0] == pytest.approx(doc["models"]["content"]["ndcg@10"])
    assert doc["best_baseline"] in doc["models"]
    pe = doc["paired"]["fusion"]["EASE"]["ndcg@10"]
    assert set(pe) == {str(P.seed), "8"} and all(r["n"] == summary["n_users"] for r in pe.values())
    assert set(doc["parts"]["content"]) == {"prior", "personal"}


def test_paired_t_matches_a_hand_computation():
    users = np.arange(4)
    a = E.EvalResult("a", {}, per_user={"ndcg@10": np.array([0.5, 0.2, 0.3, 0.9])}, users={"ndcg@10": users})
    b = E.EvalResult("b", {}, per_user={"ndcg@10": np.array([0.4, 0.2, 0.1, 0.6])}, users={"ndcg@10": users})
    r = EV.paired_t(a, b, "ndcg@10")
    d = np.array([0.1, 0.0, 0.2, 0.3])
    assert r["diff"] == pytest.approx(d.mean())
    assert r["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / 2))
    assert r["n"] == 4


def test_standardise_handles_unscorable_items():
    z = fusion.standardise(np.array([[1.0, -np.inf, 3.0], [2.0, 2.0, 2.0]]))
    assert np.isfinite(z).all() and np.all(z[1] == 0)
    assert z[0, 2] > z[0, 0] > z[0, 1]  # -inf became the neutral raw score 0
    assert z[0, 1] == pytest.approx((0.0 - 4 / 3) / np.std([1.0, 0.0, 3.0]))


def test_fusion_serves_through_the_bundle(staged, tmp_path):
    from genre_tasks.registry import serving

    paths, _, _ = staged
    fit, _ = Dataset.load(paths).phase("test")
    titles = [str(i) for i in fit.item_ids]
    bundle = serving.build_bundle(paths.model_dir / "fusion", fit, titles, tmp_path / "bundle")
    model = serving.load_local(bundle)
    assert isinstance(model.recommender, fusion.FusionRecommender)
    out = model.recommend([fit.histories[0], np.zeros(0, np.int64)], [5, 3])
    assert len(out[0][0]) == 5 and len(out[1][0]) == 3
    assert not set(out[0][0]) & {str(fit.item_ids[i]) for i in fit.histories[0]}
    assert isinstance(linear.load(bundle / "model" / fusion.EASE_DIR), linear.EaseRecommender)
    assert model.representations.shape == (fit.n_items, P.dim)  # the tower's, without its bias column
    reasons = model.explain([str(fit.item_ids[i]) for i in fit.histories[0]], out[0][0])
    assert len(reasons) == 5 and all(r.startswith("like '") for r in reasons)
    assert S.ITEM_ID in model.items.columns


def test_choose_blend_keeps_auc_within_tolerance_of_ease():
    grid = [(0.0, 0.0), (0.5, 0.0), (0.8, 0.0), (0.8, 0.2)]
    means = [(0.14, 0.14, 0.68), (0.16, 0.16, 0.675), (0.18, 0.18, 0.64), (0.17, 0.17, 0.672)]
    assert train.choose_blend(grid, means, ease_auc=0.68, tolerance=0.01) == 3  # 0.8/0 loses 0.04 AUC
    assert train.choose_blend(grid, means, ease_auc=0.68, tolerance=0.05) == 2
    assert train.choose_blend(grid, means, ease_auc=0.68, tolerance=0.0) == 0  # only EASE qualifies


def test_warm_start_begins_from_the_given_weights(staged):
    paths, _, _ = staged
    fit, ev = Dataset.load(paths).phase("valid")
    init = train.load_recommender(paths.model_dir / "content")
    p = dataclasses.replace(P, lr=1e-12, epochs=1, ema_decay=0.0)
    res = M.fit_model(p, "content", fit, None, epochs=1, show_progress=False, init=init)
    got, want = res.recommender.net.state_dict(), init.net.state_dict()
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), atol=1e-6)
    cold = M.fit_model(p, "content", fit, None, epochs=1, show_progress=False)
    assert not np.allclose(cold.recommender.net.state_dict()["content.0.weight"].numpy(),
                           want["content.0.weight"].numpy())


def test_warm_mode_retrains_only_the_source_strategy(staged, tmp_path):
    paths, _, _ = staged
    root = copy_processed(paths, tmp_path)
    source = train.load_recommender(paths.model_dir / "fusion")
    params = {"train": {**dataclasses.asdict(dataclasses.replace(P, epochs=3, patience=1)),
                        "strategies": ["content", "ease", "fusion"], "extra_seeds": [8],
                        "ease_lambda": [1.0, 10.0], "fusion_weights": [0.0, 0.5, 1.0],
                        "mode": "warm", "warm_from": str(paths.model_dir / "fusion"), "warm_epochs": 2,
                        "warm_revalidate": False}}
    summary = train.main(params, root)
    assert summary["mode"] == "warm" and summary["seeds"] == [P.seed]  # one seed
    assert set(summary["strategies"]) == {"content", "ease", "fusion"}
    # the champion's validated choices are kept; the tower is fine-tuned on train + valid for
    # exactly warm_epochs epochs, with no validation phase (no valid scores anywhere)
    assert summary["strategies"]["content"]["epochs_refit"] == 2
    assert "epochs_run" not in summary["strategies"]["content"]
    fused = train.load_recommender(root.model_dir / "fusion")
    assert (fused.weight, fused.prior_weight, fused.ease.lam) == (source.weight, source.prior_weight, source.ease.lam)
    meta = io.read_json(root.model_dir / "content" / "meta.json")
    assert meta["warm_from"] == str(paths.model_dir / "fusion") and meta["fit_phase"] == "test"
    assert len(meta["refit_history"]) == 2 and meta["history"] == []
    assert summary["selected"] == "fusion" and summary["selection_metric"] is None
    assert io.read_json(root.model_dir / "selected.json")["valid_ndcg@10"] == {"content": None, "ease": None,
                                                                             "fusion": None}
    assert (root.model_dir / "train_curve.png").stat().st_size > 0
    # fine-tuning moved the tower away from the champion's weights
    tuned = train.load_recommender(root.model_dir / "content")
    assert not np.allclose(tuned.net.state_dict()["content.0.weight"].numpy(),
                           source.tower.net.state_dict()["content.0.weight"].numpy())
    # warm_revalidate: early stopping on valid within warm_epochs, refit, the blend re-chosen
    params["train"]["warm_revalidate"] = True
    again = train.main(params, root)
    assert again["mode"] == "warm" and again["selection_metric"] == "ndcg@10"
    assert again["strategies"]["content"]["epochs_run"] <= 2
    assert again["strategies"]["fusion"]["weight"] in (0.0, 0.5, 1.0)
    # nothing to start from: a full run
    params["train"]["warm_from"] = str(tmp_path / "nothing-here")
    assert train.main(params, root)["mode"] == "full"


def test_warm_retrain_of_an_ease_champion_refits_it_at_its_lambda(staged, tmp_path):
    paths, _, _ = staged
    root = copy_processed(paths, tmp_path)
    lam = train.load_recommender(paths.model_dir / "ease").lam
    params = {"train": {**dataclasses.asdict(P), "strategies": ["content", "ease", "fusion"],
                        "ease_lambda": [1.0, 10.0], "mode": "warm", "warm_from": str(paths.model_dir / "ease"),
                        "warm_revalidate": False}}
    summary = train.main(params, root)
    assert set(summary["strategies"]) == {"ease"} and summary["selected"] == "ease"
    assert train.load_recommender(root.model_dir / "ease").lam == lam


def test_promote_accepts_a_selected_fusion_model(staged, tmp_path):
    from genre_tasks.errors import StageError
    from genre_tasks.registry import promote

    paths, _, _ = staged
    io.write_json({"strategy": "fusion"}, tmp_path / "data" / "model" / "selected.json")
    import shutil

    shutil.copytree(paths.model_dir / "fusion", tmp_path / "data" / "model" / "fusion")
    assert promote._selected_model(S.Paths(tmp_path)) == ("fusion", S.Paths(tmp_path).model_dir / "fusion")
    (tmp_path / "data" / "model" / "fusion" / "tower" / "model.pt").unlink()
    with pytest.raises(StageError, match="tower/model.pt"):
        promote._selected_model(S.Paths(tmp_path))
