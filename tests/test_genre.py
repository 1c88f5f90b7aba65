"""genre stage on synthetic embeddings: F1, filling of missing genres, outputs and refusals."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from genre_tasks import genre, io
from genre_tasks import schema as S
from genre_tasks.config import ParamsError, from_dict
from genre_tasks.errors import StageError
from genre_tasks.schema import Paths

GENRES = ["Action", "Comedy", "Drama", "Horror"]
PARAMS = {"C": 4.0, "test_frac": 0.25, "min_support": 5, "seed": 0}


def make_dataset(root, n: int = 240, n_unlabelled: int = 20, dim: int = 32, seed: int = 0):
    """Separable multi-label data: vector = normalised sum of its genres' directions + noise.

    Writes items.parquet, vectors.npy and index.parquet as preprocess + embed would; returns
    (paths, true genres of every item). The last ``n_unlabelled`` items have empty genres, one
    more item carries only the rare genre "Rare" (2 items < min_support) and the last item's
    vector is orthogonal to every genre direction (no genre reaches its threshold).
    """
    rng = np.random.default_rng(seed)
    centers = np.linalg.qr(rng.normal(size=(dim, dim)))[0][: len(GENRES)]  # orthonormal rows
    truth, vecs = [], []
    for i in range(n):
        k = rng.integers(1, 3)
        gs = sorted(rng.choice(GENRES, size=k, replace=False).tolist())
        v = sum(centers[GENRES.index(g)] for g in gs) + 0.15 * rng.normal(size=dim)
        truth.append(gs)
        vecs.append(v / np.linalg.norm(v))
    vectors = np.asarray(vecs, dtype=np.float32)
    # an item pointing away from all genre directions
    away = rng.normal(size=dim)
    away -= centers.T @ (centers @ away)
    vectors[n - 1] = away / np.linalg.norm(away)
    genres = [list(g) for g in truth]
    genres[1] = ["Rare"]
    genres[2] = genres[2] + ["Rare"]
    for i in range(n - n_unlabelled, n):
        genres[i] = []
    texts = [f"item {i}" for i in range(n)]
    paths = Paths(root)
    items = pd.DataFrame({
        S.ITEM_ID: pd.array([f"m{i}" for i in range(n)], dtype="string"),
        S.ITEM_IDX: np.arange(n, dtype=np.int32),
        S.TITLE: texts,
        S.TEXT: pd.array(texts, dtype="string"),
        S.GENRES: genres,
    })
    paths.items.parent.mkdir(parents=True, exist_ok=True)
    items.to_parquet(paths.items, index=False)
    io.save_npy(vectors, paths.vectors)
    io.write_parquet(pd.DataFrame({S.ITEM_ID: items[S.ITEM_ID].astype(str), S.ITEM_IDX: items[S.ITEM_IDX],
                                   "text_hash": [io.text_sha1(t) for t in texts]}), paths.vector_index)
    return paths, truth


def test_genre_stage_learns_and_fills(tmp_path) -> None:
    paths, truth = make_dataset(tmp_path)
    summary = genre.main({"genre": PARAMS}, paths)
    assert summary["micro_f1"] > 0.9 and summary["macro_f1"] > 0.9, summary
    assert summary["n_labels"] == 4 and summary["n_labels_model"] == 4  # "Rare" dropped
    assert summary["n_train"] + summary["n_test"] == summary["n_labelled"] == 220
    assert summary["n_test"] == 55 and summary["n_filled"] == 20
    assert json.loads(paths.metrics("genre").read_text()) == summary

    pred = pd.read_parquet(paths.genre_dir / "predictions.parquet")
    assert pred[S.ITEM_IDX].tolist() == list(range(240))
    filled = pred["genres_filled"].map(list)
    # labelled items keep their own genres (even the unlearned "Rare")
    assert filled[1] == ["Rare"] and "Rare" in filled[2]
    assert (pred["genres_source"] == "predicted").sum() == 20
    # unlabelled items get the genres they were generated with
    tail = range(220, 239)
    exact = sum(sorted(filled[i]) == truth[i] for i in tail)
    assert all(len(filled[i]) > 0 for i in tail) and exact >= 17, exact
    # every prediction is non-empty; the unlabelled item far from every genre gets its top-1
    assert pred["genres_pred"].map(len).min() >= 1
    bundle = genre.load_model(paths.genre_dir / "model.joblib")
    assert (np.asarray(pred["genre_probs"][239]) < np.asarray(bundle["thresholds"])).all()
    assert filled[239] == [pred["top_genre"][239]]
    assert 0.2 < min(bundle["thresholds"]) and max(bundle["thresholds"]) < 0.8

    labels = json.loads((paths.genre_dir / "labels.json").read_text())
    assert labels == GENRES and len(pred["genre_probs"][5]) == 4
    lists, probs = genre.predict_genres(bundle, np.load(paths.vectors)[220:])
    assert lists == [list(g) for g in pred["genres_pred"][220:]] and probs.shape == (20, 4)
    report = json.loads((paths.genre_dir / "eval.json").read_text())
    assert report["dropped_genres"] == ["Rare"] and set(report["per_genre"]) == set(GENRES)

    # deterministic
    again = genre.main({"genre": PARAMS}, paths)
    assert again == summary
    pd.testing.assert_frame_equal(pd.read_parquet(paths.genre_dir / "predictions.parquet"), pred)


def test_decide_keeps_top1() -> None:
    probs = np.array([[0.1, 0.3, 0.2], [0.9, 0.6, 0.1], [0.2, 0.2, 0.4]], dtype=np.float32)
    assert genre.decide(probs).tolist() == [[False, True, False], [True, True, False],
                                            [False, False, True]]


def test_single_genre_probabilities() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 8)).astype(np.float32)
    gs = [["A"] if x[0] > 0 else ["B"] for x in X]
    clf = genre.fit_classifier(X, gs, ["A"], 1.0)  # sklearn treats one label as a binary task
    probs = genre.predict_proba(clf, X)
    assert probs.shape == (30, 1)
    assert ((probs[:, 0] > 0.5) == (X[:, 0] > 0)).mean() > 0.9


def test_genre_refuses_stale_or_missing_inputs(tmp_path) -> None:
    paths = Paths(tmp_path)
    with pytest.raises(StageError, match="preprocess"):
        genre.main({"genre": PARAMS}, paths)
    make_dataset(tmp_path, n=40, n_unlabelled=5)
    items = pd.read_parquet(paths.items)
    items.loc[3, S.TEXT] = "edited after embedding"
    items.to_parquet(paths.items, index=False)
    with pytest.raises(StageError, match="re-run the embed"):
        genre.main({"genre": PARAMS}, paths)


def test_genre_needs_labels(tmp_path) -> None:
    paths, _ = make_dataset(tmp_path, n=40, n_unlabelled=5)
    with pytest.raises(StageError, match="min_support"):
        genre.main({"genre": {**PARAMS, "min_support": 1000}}, paths)


def test_params_validation() -> None:
    for bad in ({"C": 0.0}, {"test_frac": 1.0}, {"min_support": 0}, {"extra": 1}):
        with pytest.raises(ParamsError):
            from_dict(genre.GenreParams, {**PARAMS, **bad})
