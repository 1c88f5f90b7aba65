"""genre stage on synthetic features: F1, filling of missing genres, outputs and refusals, and
that the classifier's features never contain the genres (genre.text_columns).

The encoder is replaced by ``fake_encoder`` (a lookup of synthetic vectors by text, hash-seeded
random vectors for other texts), except in the ``slow`` test with the real MiniLM.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest

from genre_tasks import io, logs
from genre_tasks.features import embed
from genre_tasks.features import genre
from genre_tasks import schema as S
from genre_tasks.config import ParamsError, from_dict
from genre_tasks.errors import StageError
from genre_tasks.schema import Paths

GENRES = ["Action", "Comedy", "Drama", "Horror"]
PARAMS = {"C": 4.0, "test_frac": 0.25, "min_support": 5, "seed": 0}
#: the old behaviour: the embed stage's vectors (of "title (year). Genres: ...")
EMBED_PARAMS = {**PARAMS, "text_columns": None}
DIM = 32


def text_vector(text: str, dim: int = DIM) -> np.ndarray:
    """A unit vector determined by the text alone (different texts -> different vectors)."""
    seed = int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).normal(size=dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


class FakeEncoder:
    """Stands in for ``embed.encode_texts``: ``table`` lookup, else :func:`text_vector`."""

    def __init__(self) -> None:
        self.table: dict[str, np.ndarray] = {}
        self.calls: list[list[str]] = []

    def __call__(self, texts, model_path=None, batch_size=64, max_length=128, threads=2,
                 show_progress=False) -> np.ndarray:
        texts = [str(t) for t in texts]
        self.calls.append(texts)
        return np.array([self.table[t] if t in self.table else text_vector(t) for t in texts],
                        dtype=np.float32).reshape(len(texts), DIM)

    @property
    def encoded(self) -> list[str]:
        return [t for call in self.calls for t in call]


@pytest.fixture
def fake_encoder(monkeypatch) -> FakeEncoder:
    enc = FakeEncoder()
    monkeypatch.setattr(embed, "encode_texts", enc)
    return enc


def write_items(root, items: pd.DataFrame, vectors: np.ndarray | None = None) -> Paths:
    """items.parquet as preprocess writes it (+ the embed outputs for ``vectors`` [n, d])."""
    paths = Paths(root)
    paths.items.parent.mkdir(parents=True, exist_ok=True)
    items.to_parquet(paths.items, index=False)
    if vectors is not None:
        io.save_npy(np.asarray(vectors, dtype=np.float32), paths.vectors)
        io.write_parquet(pd.DataFrame({S.ITEM_ID: items[S.ITEM_ID].astype(str), S.ITEM_IDX: items[S.ITEM_IDX],
                                       "text_hash": [io.text_sha1(t) for t in items[S.TEXT]]}),
                         paths.vector_index)
    return paths


def ml_text(title: str, year: str | None, genres: list[str]) -> str:
    """The MovieLens adapter's item text: the genres are in it."""
    text = f"{title} ({year})." if year else f"{title}."
    return f"{text} Genres: {', '.join(genres)}." if genres else text


def make_dataset(root, n: int = 240, n_unlabelled: int = 20, dim: int = DIM, seed: int = 0,
                 encoder: FakeEncoder | None = None):
    """Separable multi-label data: vector = normalised sum of its genres' directions + noise.

    Item i: title "item i", year, text "item i (year). Genres: ..." (as the MovieLens adapter).
    Writes items.parquet, vectors.npy and index.parquet as preprocess + embed would, and maps the
    feature text "item i year" to the same vector in ``encoder``'s table; returns (paths, true
    genres of every item). The last ``n_unlabelled`` items have empty genres, one more item
    carries only the rare genre "Rare" (2 items < min_support) and the last item's vector is
    orthogonal to every genre direction (no genre reaches its threshold).
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
    titles = [f"item {i}" for i in range(n)]
    years = [str(1980 + i % 20) for i in range(n)]
    texts = [ml_text(t, y, g) for t, y, g in zip(titles, years, genres)]
    items = pd.DataFrame({
        S.ITEM_ID: pd.array([f"m{i}" for i in range(n)], dtype="string"),
        S.ITEM_IDX: np.arange(n, dtype=np.int32),
        S.TITLE: titles,
        S.TEXT: pd.array(texts, dtype="string"),
        S.GENRES: genres,
        "year": pd.array(years, dtype="string"),
    })
    if encoder is not None:
        encoder.table.update({f"{t} {y}": v for t, y, v in zip(titles, years, vectors)})
    return write_items(root, items, vectors), truth


def features_of(paths: Paths, p: dict) -> np.ndarray:
    """The classifier's feature matrix [n_items, d] for params section ``p``."""
    log = logs.StageLog("genre", logging.getLogger("genre.genre"))
    items = genre._load_items(paths, log)
    X, _, _ = genre.item_features(items, from_dict(genre.GenreParams, p), paths, log)
    return X


@pytest.mark.parametrize("mode", ["text", "embed"])
def test_genre_stage_learns_and_fills(tmp_path, fake_encoder, mode) -> None:
    paths, truth = make_dataset(tmp_path, encoder=fake_encoder)
    params = PARAMS if mode == "text" else EMBED_PARAMS
    if mode == "text":  # genre.text_columns (default [title, year]) needs no embed outputs
        shutil.rmtree(paths.embeddings_dir)
    summary = genre.main({"genre": params}, paths)
    assert summary["micro_f1"] > 0.9 and summary["macro_f1"] > 0.9, summary
    assert summary["n_labels"] == 4 and summary["n_labels_model"] == 4  # "Rare" dropped
    assert summary["n_train"] + summary["n_test"] == summary["n_labelled"] == 220
    assert summary["n_test"] == 55 and summary["n_filled"] == 20 and summary["dim"] == DIM
    # the embed text names every item's genres; the title + year features name none
    assert summary["genre_in_text"] == (0.0 if mode == "text" else 1.0)
    assert json.loads(paths.metrics("genre").read_text()) == summary
    if mode == "text":  # every item's "title year", encoded once (no genre words)
        assert sorted(fake_encoder.encoded) == sorted(f"item {i} {1980 + i % 20}" for i in range(240))
    else:
        assert fake_encoder.encoded == []

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
    # the filled genres come from the same features as the evaluation
    X = features_of(paths, params)
    lists, probs = genre.predict_genres(bundle, X[220:])
    assert lists == [list(g) for g in pred["genres_pred"][220:]] and probs.shape == (20, 4)
    report = json.loads((paths.genre_dir / "eval.json").read_text())
    assert report["dropped_genres"] == ["Rare"] and set(report["per_genre"]) == set(GENRES)
    if mode == "text":
        assert bundle["features"]["text_columns"] == ["title", "year"]
        assert report["features"]["source"] == "text"
        # new items: rows with title + year (no genres, no text) -> the same predictions
        new = pd.read_parquet(paths.items).iloc[220:][[S.TITLE, "year"]]
        assert genre.predict_items(bundle, new)[0] == lists
    else:
        assert bundle["features"]["source"] == "embed"
        with pytest.raises(ValueError, match="predict_genres"):
            genre.predict_items(bundle, pd.read_parquet(paths.items))

    # deterministic; the persistent cache serves every feature text on a re-run
    fake_encoder.calls.clear()
    again = genre.main({"genre": params}, paths)
    assert again == summary and fake_encoder.encoded == []
    pd.testing.assert_frame_equal(pd.read_parquet(paths.genre_dir / "predictions.parquet"), pred)


def test_features_do_not_depend_on_genre_words(tmp_path, fake_encoder) -> None:
    """Same title + year, different genres (and so different embed text) -> same features."""
    rows = [("Twin", "1990", ["Action"]), ("Twin", "1990", ["Comedy", "Drama"]),
            ("Solo", "1991", ["Horror"]), ("Solo", "1991", []),  # unlabelled twin: filled alike
            *[(f"pad {i}", "2000", [GENRES[i % 4]]) for i in range(16)]]
    n = len(rows)
    items = pd.DataFrame({
        S.ITEM_ID: pd.array([f"m{i}" for i in range(n)], dtype="string"),
        S.ITEM_IDX: np.arange(n, dtype=np.int32),
        S.TITLE: [r[0] for r in rows],
        S.TEXT: pd.array([ml_text(*r) for r in rows], dtype="string"),
        S.GENRES: [r[2] for r in rows],
        "year": pd.array([r[1] for r in rows], dtype="string"),
    })
    embed_vectors = np.array([text_vector(t) for t in items[S.TEXT]])  # the embed stage's
    paths = write_items(tmp_path, items, embed_vectors)
    params = {**PARAMS, "min_support": 1}

    X = features_of(paths, params)
    assert np.array_equal(X[0], X[1]) and np.array_equal(X[2], X[3])
    assert not np.array_equal(X[0], X[2])
    genre_words = {g.lower() for r in rows for g in r[2]} | {"genres"}
    assert fake_encoder.encoded and not any(w in t.lower() for t in fake_encoder.encoded
                                            for w in genre_words)
    # the old features (embed vectors of "Twin (1990). Genres: Action.") do depend on them
    X_old = features_of(paths, {**params, "text_columns": None})
    assert not np.array_equal(X_old[0], X_old[1])

    genre.main({"genre": params}, paths)
    pred = pd.read_parquet(paths.genre_dir / "predictions.parquet")
    probs = np.stack(pred["genre_probs"].to_numpy())
    np.testing.assert_array_equal(probs[0], probs[1])
    np.testing.assert_array_equal(probs[2], probs[3])
    assert list(pred["genres_filled"][3]) == list(pred["genres_pred"][2])  # twin's prediction
    assert pred["genres_source"][3] == "predicted"


def test_feature_texts_and_missing_columns(tmp_path, fake_encoder, caplog) -> None:
    items = pd.DataFrame({"title": ["A", "B", None, "D"],
                          "year": pd.array(["1995", None, "2001", " "], dtype="string"),
                          "n": [1.0, np.nan, 3.5, 4.0], "tags": [["x", "y"], [], None, ["z"]]})
    assert genre.feature_texts(items, ["title", "year"]) == ["A 1995", "B", "2001", "D"]
    assert genre.feature_texts(items, ["n", "tags"]) == ["1 x y", "", "3.5", "4 z"]
    assert genre.genre_word_share(["Action Jackson 1988", "Sabrina 1954", "x"],
                                  [["Action", "Comedy"], ["Romance"], []]) == 0.5

    # MIND-like items: no year column -> title only (logged); no usable column at all -> refused
    paths, _ = make_dataset(tmp_path, n=40, n_unlabelled=5)
    items = pd.read_parquet(paths.items).drop(columns="year")
    items.to_parquet(paths.items, index=False)
    with caplog.at_level(logging.INFO, logger="genre"):
        summary = genre.main({"genre": {**PARAMS, "min_support": 1}}, paths)
    assert "['year']: not in the items" in caplog.text
    assert sorted(fake_encoder.encoded) == sorted(f"item {i}" for i in range(40))
    assert summary["genre_in_text"] == 0.0
    bundle = genre.load_model(paths.genre_dir / "model.joblib")
    assert bundle["features"]["text_columns"] == ["title"]
    with pytest.raises(StageError, match="none of genre.text_columns"):
        genre.main({"genre": {**PARAMS, "text_columns": ["year", "abstract"]}}, paths)


@pytest.mark.slow
def test_real_encoder_features_ignore_genres_and_are_cached(tmp_path) -> None:
    """With the packaged MiniLM: identical title + year -> identical features; cache re-used."""
    titles = ["Toy Story", "Toy Story", "GoldenEye", "Heat", "Casablanca", "Alien"] * 2
    genres = [["Animation"], ["Comedy"], ["Action"], ["Action"], ["Drama"], ["Horror"]] * 2
    n = len(titles)
    items = pd.DataFrame({
        S.ITEM_ID: pd.array([f"m{i}" for i in range(n)], dtype="string"),
        S.ITEM_IDX: np.arange(n, dtype=np.int32),
        S.TITLE: titles,
        S.TEXT: pd.array([ml_text(t, "1995", g) for t, g in zip(titles, genres)], dtype="string"),
        S.GENRES: genres,
        "year": pd.array(["1995"] * n, dtype="string"),
    })
    paths = write_items(tmp_path, items)
    params = {**PARAMS, "min_support": 1, "test_frac": 0.3, "batch_size": 4, "threads": 1}
    X = features_of(paths, params)
    assert X.shape == (n, 384) and np.array_equal(X[0], X[1])
    np.testing.assert_allclose(X[2], embed.encode_texts(["GoldenEye 1995"], max_length=64)[0], atol=1e-5)
    shards = list(paths.embed_cache.rglob("shard-*.npz"))
    assert len(shards) == 1
    genre.main({"genre": params}, paths)
    assert list(paths.embed_cache.rglob("shard-*.npz")) == shards  # nothing new to encode


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


def test_genre_refuses_stale_or_missing_inputs(tmp_path, fake_encoder) -> None:
    paths = Paths(tmp_path)
    for params in (PARAMS, EMBED_PARAMS):
        with pytest.raises(StageError, match="preprocess"):
            genre.main({"genre": params}, paths)
    make_dataset(tmp_path, n=40, n_unlabelled=5)
    items = pd.read_parquet(paths.items)
    items.loc[3, S.TEXT] = "edited after embedding"
    items.to_parquet(paths.items, index=False)
    with pytest.raises(StageError, match="re-run the embed"):
        genre.main({"genre": EMBED_PARAMS}, paths)
    genre.main({"genre": PARAMS}, paths)  # title + year features: the embed outputs are not read
    shutil.rmtree(paths.embeddings_dir)
    with pytest.raises(StageError, match="run the embed stage"):
        genre.main({"genre": EMBED_PARAMS}, paths)


def test_genre_needs_labels(tmp_path, fake_encoder) -> None:
    paths, _ = make_dataset(tmp_path, n=40, n_unlabelled=5)
    with pytest.raises(StageError, match="min_support"):
        genre.main({"genre": {**PARAMS, "min_support": 1000}}, paths)
    assert fake_encoder.encoded == []  # refused before encoding anything


def test_params_validation() -> None:
    p = from_dict(genre.GenreParams, PARAMS)
    assert p.text_columns == ("title", "year") and p.model_path is None and p.max_length == 64
    assert from_dict(genre.GenreParams, EMBED_PARAMS).text_columns is None
    for bad in ({"C": 0.0}, {"test_frac": 1.0}, {"min_support": 0}, {"extra": 1},
                {"text_columns": []}, {"text_columns": ["title", "genres"]}, {"text_columns": [""]},
                {"text_columns": "title"}, {"max_length": 1}, {"batch_size": 0}, {"threads": 0}):
        with pytest.raises(ParamsError):
            from_dict(genre.GenreParams, {**PARAMS, **bad})
