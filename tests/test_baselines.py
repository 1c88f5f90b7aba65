"""baselines: closed forms, scoring new histories, and quality on data with a clear structure.

``synthetic_raw`` / ``synthetic_dataset`` build a small clustered dataset (also used by
test_evaluate.py): items in clusters with Zipf popularity inside each cluster, every user
belongs to one taste group (groups of unequal size) and likes (rating 4-5) items of its cluster and dislikes (rating 1-2) a few others; item vectors
point to their cluster's direction plus noise.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from genre_tasks.models import baselines as B
from genre_tasks.models import views as D
from genre_tasks import schema as S
from genre_tasks.evaluation.protocol import evaluate_recommender
from genre_tasks.data.preprocess import PreprocessParams, SplitParams, preprocess


def synthetic_raw(n_users: int = 160, n_items: int = 120, n_clusters: int = 4, liked: int = 12,
                  disliked: int = 5, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    cluster = np.arange(n_items) % n_clusters
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance", "Western"]
    items = pd.DataFrame({
        S.ITEM_ID: pd.array([f"m{j}" for j in range(n_items)], dtype="string"),
        S.TITLE: pd.array([f"Movie {j}" for j in range(n_items)], dtype="string"),
        S.TEXT: pd.array([f"Movie {j} of cluster {cluster[j]}" for j in range(n_items)], dtype="string"),
        S.GENRES: [[genres[cluster[j] % len(genres)]] for j in range(n_items)],
    })
    rows = []
    share = 1.0 / np.arange(1, n_clusters + 1)  # bigger and smaller taste groups
    taste = rng.choice(n_clusters, size=n_users, p=share / share.sum())
    for u in range(n_users):
        c = taste[u]
        mine = np.flatnonzero(cluster == c)
        other = np.flatnonzero(cluster != c)
        weight = 1.0 / np.arange(1, len(mine) + 1)  # Zipf popularity inside the cluster
        pick = rng.choice(mine, size=liked, replace=False, p=weight / weight.sum())
        bad = rng.choice(other, size=disliked, replace=False)
        events = [(j, float(rng.integers(4, 6))) for j in pick] + [(j, float(rng.integers(1, 3))) for j in bad]
        times = np.sort(rng.choice(10_000, size=len(events), replace=False))
        order = rng.permutation(len(events))
        for t, k in zip(times, order):
            j, r = events[k]
            rows.append((str(u), f"m{j}", 900_000_000 + int(t), r))
    inter = pd.DataFrame(rows, columns=[S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.RATING])
    inter[S.USER_ID] = inter[S.USER_ID].astype("string")
    inter[S.ITEM_ID] = inter[S.ITEM_ID].astype("string")
    inter[S.LABEL] = pd.array([pd.NA] * len(inter), dtype="Int8")
    inter[S.IMPRESSION_ID] = pd.array([pd.NA] * len(inter), dtype="string")
    return items, inter


def synthetic_vectors(items: pd.DataFrame, n_clusters: int = 4, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim))
    cluster = np.arange(len(items)) % n_clusters
    v = centers[cluster] + 0.5 * rng.normal(size=(len(items), dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def synthetic_dataset(mode: str = "user_temporal", **kwargs) -> D.Dataset:
    items, inter = synthetic_raw(**kwargs)
    items, inter, hist, _ = preprocess(items, inter, PreprocessParams(split=SplitParams(mode=mode)))
    return D.Dataset(items=items, interactions=inter, histories=hist, vectors=synthetic_vectors(items))


@pytest.fixture(scope="module")
def phases():
    ds = synthetic_dataset()
    return ds.phase("valid"), ds.phase("test")


ALL = [B.Random(seed=1), B.MostPop(), B.ItemKNN(k=10), B.EASE(lam=10.0), B.ContentMean()]


@pytest.mark.parametrize("rec", ALL, ids=lambda r: r.name)
def test_every_baseline_is_a_recommender_with_the_right_shape(rec, phases):
    (_, _), (fit, _) = phases
    assert isinstance(rec, D.Recommender)
    rec.fit(fit)
    s = rec.score([fit.histories[0], np.array([3, 5]), np.array([], dtype=np.int64)], fit)
    assert s.shape == (3, fit.n_items) and s.dtype == np.float32 and np.isfinite(s).all()


def test_structured_baselines_beat_random(phases):
    _, (fit, ev) = phases
    ndcg = {rec.name: evaluate_recommender(rec.fit(fit), fit, ev, seed=0).metrics["ndcg@10"] for rec in ALL}
    for name in ("MostPop", "ItemKNN", "EASE", "ContentMean"):
        assert ndcg[name] > ndcg["Random"] + 0.05, ndcg
    assert ndcg["EASE"] > ndcg["MostPop"] + 0.1 and ndcg["ItemKNN"] > ndcg["MostPop"] + 0.1, ndcg


def test_ease_matches_a_direct_per_column_ridge_solution():
    rng = np.random.default_rng(0)
    x = (rng.random((40, 12)) < 0.3).astype(np.float64)
    lam = 3.0
    b = B.EASE.closed_form(sparse.csr_matrix(x), lam)
    assert np.allclose(np.diag(b), 0.0)
    # column j: argmin ||x_j - X_{-j} w||^2 + lam ||w||^2 (the diagonal constraint drops x_j)
    for j in range(x.shape[1]):
        others = [i for i in range(x.shape[1]) if i != j]
        xo = x[:, others]
        w = np.linalg.solve(xo.T @ xo + lam * np.eye(len(others)), xo.T @ x[:, j])
        assert np.allclose(b[others, j], w, atol=1e-10)


def test_spd_inverse_is_the_inverse_and_falls_back_when_not_positive_definite():
    rng = np.random.default_rng(1)
    x = (rng.random((200, 60)) < 0.1).astype(np.float64)
    g = x.T @ x + 5.0 * np.eye(60)
    before = g.copy()
    inv = B.spd_inverse(g)
    assert np.array_equal(g, before), "the input is not overwritten"
    assert np.array_equal(inv, inv.T)
    assert np.allclose(inv, np.linalg.inv(g), rtol=1e-12, atol=1e-14)
    assert np.allclose(g @ inv, np.eye(60), atol=1e-10)
    # symmetric but indefinite: Cholesky fails, the LU inverse answers
    m = np.array([[1.0, 2.0], [2.0, 1.0]])
    assert np.allclose(B.spd_inverse(m), np.linalg.inv(m))


def test_ease_scores_new_histories_from_its_weights(phases):
    _, (fit, _) = phases
    rec = B.EASE(lam=10.0).fit(fit)
    s = rec.score([np.array([4, 7]), np.array([4])], fit)
    assert np.allclose(s[0], rec.weights[4] + rec.weights[7], atol=1e-6)
    assert np.allclose(s[1], rec.weights[4])
    with pytest.raises(ValueError, match="max_items"):
        small = B.EASE()
        small.max_items = 10
        small.fit(fit)


def test_itemknn_keeps_the_top_k_cosine_neighbours(phases):
    _, (fit, _) = phases
    x = fit.positives.toarray().astype(np.float64)
    co = x.T @ x
    norm = np.sqrt(np.diag(co))
    cos = np.divide(co, np.outer(norm, norm), out=np.zeros_like(co), where=np.outer(norm, norm) > 0)
    np.fill_diagonal(cos, 0.0)
    full = B.ItemKNN(k=10_000, block=7).fit(fit).similarity.toarray()
    assert np.allclose(full, cos, atol=1e-6)
    k = 5
    knn = B.ItemKNN(k=k, block=16).fit(fit).neighbours.toarray()  # row j: candidate j's neighbours
    assert ((knn > 0).sum(axis=1) <= k).all()
    for i in range(fit.n_items):
        kept = np.flatnonzero(knn[i])
        assert np.allclose(knn[i, kept], cos[i, kept], atol=1e-6)
        if len(kept) == k:  # nothing dropped is more similar than what was kept
            assert np.delete(cos[i], kept).max() <= knn[i, kept].min() + 1e-6
    # the standard rule: candidate j scores the history items among ITS k nearest neighbours
    s = B.ItemKNN(k=k).fit(fit).score([np.array([2, 9])], fit)
    assert np.allclose(s[0], knn[:, 2] + knn[:, 9], atol=1e-6)
    assert ((s[0] > 0) == ((knn[:, 2] > 0) | (knn[:, 9] > 0))).all()


def test_itemknn_blocks_are_bounded_by_cells_not_by_the_catalogue(phases, monkeypatch):
    """A big catalogue shrinks the item blocks (block x I dense cells at most), same neighbours."""
    _, (fit, _) = phases
    ref = B.ItemKNN(k=5).fit(fit).neighbours.toarray()
    shapes = []
    real = np.argpartition

    def spy(a, *args, **kwargs):
        shapes.append(np.shape(a))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(B.ItemKNN, "block_cells", 3 * fit.n_items + 1)
    monkeypatch.setattr(B.np, "argpartition", spy)
    small = B.ItemKNN(k=5).fit(fit).neighbours.toarray()
    monkeypatch.undo()
    assert shapes and max(r * c for r, c in shapes) <= 3 * fit.n_items
    assert {r for r, _ in shapes} == {3} | ({fit.n_items % 3} - {0})
    assert np.allclose(small, ref)


def test_content_mean_is_the_cosine_to_the_mean_history_vector(phases):
    _, (fit, _) = phases
    rec = B.ContentMean().fit(fit)
    hist = np.array([1, 5, 9])
    u = fit.item_vectors[hist].mean(axis=0)
    expected = fit.item_vectors @ (u / np.linalg.norm(u))
    assert np.allclose(rec.score([hist], fit)[0], expected, atol=1e-5)
    assert np.allclose(rec.score([np.array([], dtype=np.int64)], fit), 0.0)


def test_mostpop_and_random(phases):
    _, (fit, _) = phases
    s = B.MostPop().fit(fit).score([np.array([1]), np.array([2])], fit)
    assert np.array_equal(s[0], fit.popularity.astype(np.float32)) and np.array_equal(s[0], s[1])
    a = B.Random(seed=3).fit(fit).score([np.array([1])] * 4, fit)
    b = B.Random(seed=3).fit(fit).score([np.array([1])] * 4, fit)
    c = B.Random(seed=4).fit(fit).score([np.array([1])] * 4, fit)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_scoring_checks_fit_and_catalogue(phases):
    _, (fit, _) = phases
    with pytest.raises(RuntimeError, match="before fit"):
        B.EASE().score([np.array([1])], fit)
    with pytest.raises(ValueError, match="out of range"):
        B.MostPop().fit(fit)
        B.ItemKNN(k=5).fit(fit).score([np.array([fit.n_items])], fit)
    with pytest.raises(ValueError, match="unknown baseline"):
        B.make_baseline("svd")
    assert B.make_baseline("ease", lam=5.0).lam == 5.0 and B.make_baseline("random", seed=9).seed == 9
