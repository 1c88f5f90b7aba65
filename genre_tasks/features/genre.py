"""genre stage: a multi-label genre classifier on genre-free item text, and genres for items without.

Reads ``data/processed/items.parquet`` (item_id, item_idx, genres and the ``text_columns``).
Items with a non-empty ``genres`` list are the labelled items; genres carried by fewer than
``min_support`` labelled items are not learned.

Features (``genre.text_columns``): the classifier exists to fill in genres for items that arrive
*without* them, so it must not read the genres. The embed stage's text can contain them (the
MovieLens adapter writes "Toy Story (1995). Genres: Animation, Children's, Comedy."), which
makes a classifier on those vectors score near-perfect F1 by reading the answer. So by default
each item's feature text is its ``text_columns`` values (default ``[title, year]``; null/empty
values skipped; columns the items do not have are skipped and logged, e.g. MIND has no ``year``)
joined with " ", encoded with :func:`genre_tasks.features.embed.encode_texts` (``model_path``,
``max_length``, ``batch_size``, ``threads`` of this section) through the embed stage's persistent
cache (``EmbeddingCache`` under ``.cache/embeddings/<model_id>/``), so a re-run encodes nothing.
``text_columns: null`` = the old behaviour: the embed stage's vectors (``data/embeddings/``,
checked to belong to exactly these items and texts). That LEAKS the genres whenever the embed
text contains them (MovieLens) and then inflates the held-out F1; it is only sound for text
without genres. ``genre_in_text`` in the metrics is the share of labelled items whose feature
text names one of their own genres (word match; a warning is logged above 0.5): ~1.0 means the
scores are inflated, a few percent is titles like "Action Jackson". Evaluation, the final model
and the filled genres all use the same features.

Model: one-vs-rest logistic regression (``C``) on the feature vectors. Decision rule: genre g is
predicted when P(g) >= t_g; an item with no genre at or above its threshold gets its single most
probable genre (so every item gets >= 1 genre). The per-genre thresholds t_g maximise F1 on
out-of-fold probabilities of the model's *training* items (3-fold CV, grid 0.05..0.95); a genre
with fewer than 3 training positives keeps 0.5. Held-out items never influence thresholds.

1. Evaluation: the labelled items are split (seeded) into train / held-out (``test_frac``); the
   model + thresholds are fitted on train and scored on held-out.
   ``metrics/genre.json``: micro_f1, macro_f1 (macro over the genres present in the held-out
   items), n_train, n_test, n_labels (genres scored on held-out), micro_f1_t05 / macro_f1_t05
   (same model, fixed 0.5 thresholds, for comparison), n_labels_model, n_labelled, n_filled,
   n_items, genre_in_text (see above), dim (feature dimension).
2. Final model: refitted (thresholds included) on all labelled items, applied to every item.
   ``data/genre/`` (replaced as a whole, atomically):
   ``model.joblib``         {"classifier": OneVsRestClassifier, "labels": [G] str,
                            "thresholds": float [G], "dim", "sklearn_version",
                            "features": {"source": "text" | "embed", "text_columns" (the
                            columns used, or None), "model_path", "max_length", "model_id"}};
                            use :func:`load_model` + :func:`predict_items` (new items as rows
                            with the text columns) or :func:`predict_genres` (feature vectors)
   ``predictions.parquet``  item_id, item_idx, genres (original), genres_pred (list[str],
                            never empty), genres_filled (original genres if non-empty, else
                            genres_pred), genres_source ("original" | "predicted"),
                            top_genre, top_prob, genre_probs (list[float32] [G], label order)
   ``labels.json``          the label list [G] (column order of genre_probs)
   ``eval.json``            per-genre held-out support / precision / recall / F1, the
                            thresholds of the evaluated and of the final model, the features
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from genre_tasks import config, io, logs
from genre_tasks.features import embed
from genre_tasks import schema as S
from genre_tasks.config import ParamsError
from genre_tasks.errors import StageError
from genre_tasks.schema import Paths

#: Threshold of genres too rare in the training items to tune one.
THRESHOLD = 0.5
#: Candidate per-genre thresholds and the CV used to choose among them (training items only).
THRESHOLD_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))
CV_FOLDS = 3
MIN_POSITIVES_TO_TUNE = 3
#: Iteration cap of each per-genre logistic regression (lbfgs).
MAX_ITER = 2000
#: BLAS/OpenMP threads while fitting. The problems are small (n x d matrix-vector products):
#: one thread was 0.3 s vs 16-33 s with two on the shared 2-core box (threads spin-wait under
#: load), and never slower when idle.
BLAS_THREADS = 1

PREDICTIONS = "predictions.parquet"
MODEL = "model.joblib"


@dataclass(frozen=True)
class GenreParams:
    """``genre`` section of params.yaml.

    C             inverse L2 regularisation of each per-genre logistic regression (> 0)
    test_frac     share of labelled items held out for micro/macro F1 (0 < test_frac < 1)
    min_support   genres carried by fewer labelled items are dropped from the label set (>= 1)
    seed          seed of the train/held-out split
    text_columns  item columns joined with " " into the text the classifier reads (absent
                  columns skipped, at least one must exist; never ``genres``); null = the embed
                  stage's vectors, which leak the genres when the embed text contains them
    model_path    encoder folder for text_columns; null = the packaged all-MiniLM-L6-v2
    max_length    tokens kept per feature text (>= 2)
    batch_size    texts per forward pass (>= 1)
    threads       torch intra-op threads while encoding (>= 1)
    """

    C: float = 4.0
    test_frac: float = 0.2
    min_support: int = 5
    seed: int = 42
    text_columns: tuple[str, ...] | None = (S.TITLE, "year")
    model_path: str | None = None
    max_length: int = 64
    batch_size: int = 64
    threads: int = 2

    def validate(self) -> None:
        if not self.C > 0:
            raise ParamsError(f"genre.C: must be > 0, got {self.C}")
        if not 0 < self.test_frac < 1:
            raise ParamsError(f"genre.test_frac: must be in (0, 1), got {self.test_frac}")
        if self.min_support < 1:
            raise ParamsError(f"genre.min_support: must be >= 1, got {self.min_support}")
        if self.text_columns is not None:
            if not self.text_columns or any(not str(c).strip() for c in self.text_columns):
                raise ParamsError("genre.text_columns: a non-empty list of column names, or null "
                                  f"(= the embed stage's vectors), got {list(self.text_columns)}")
            if S.GENRES in self.text_columns:
                raise ParamsError(f"genre.text_columns: must not contain '{S.GENRES}' (the labels)")
        if self.max_length < 2:
            raise ParamsError(f"genre.max_length: must be >= 2, got {self.max_length}")
        if self.batch_size < 1:
            raise ParamsError(f"genre.batch_size: must be >= 1, got {self.batch_size}")
        if self.threads < 1:
            raise ParamsError(f"genre.threads: must be >= 1, got {self.threads}")


# --- model -----------------------------------------------------------------------------------

def fit_classifier(X: np.ndarray, genres: list[list[str]], labels: list[str], C: float) -> Any:
    """One-vs-rest logistic regression on X [n, d] for multi-hot targets over ``labels`` [G].

    Genres outside ``labels`` are ignored; a genre with no positive (or no negative) example
    becomes a constant predictor.
    """
    import warnings

    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from threadpoolctl import threadpool_limits

    y = binarize(genres, labels)
    clf = OneVsRestClassifier(LogisticRegression(C=C, max_iter=MAX_ITER))
    with warnings.catch_warnings(), threadpool_limits(BLAS_THREADS):
        warnings.filterwarnings("ignore", message="Label .* is present in all training examples")
        warnings.filterwarnings("ignore", message="Label not .* is present in all training examples")
        clf.fit(X, y)
    return clf


def binarize(genres: list[list[str]], labels: list[str]) -> np.ndarray:
    """Multi-hot int8 [n, G] of ``genres`` over ``labels`` (unknown genres ignored)."""
    col = {g: j for j, g in enumerate(labels)}
    y = np.zeros((len(genres), len(labels)), dtype=np.int8)
    for i, gs in enumerate(genres):
        for g in gs:
            j = col.get(g)
            if j is not None:
                y[i, j] = 1
    return y


def decide(probs: np.ndarray, thresholds: float | np.ndarray = THRESHOLD) -> np.ndarray:
    """bool [n, G]: P >= threshold (scalar or per genre [G]); a row with no genre at or above
    its threshold gets its most probable genre, so no row is empty (when G >= 1)."""
    pred = probs >= np.asarray(thresholds, dtype=probs.dtype)
    if probs.shape[1]:
        empty = ~pred.any(axis=1)
        pred[np.flatnonzero(empty), probs[empty].argmax(axis=1)] = True
    return pred


def tune_thresholds(X: np.ndarray, genres: list[list[str]], labels: list[str], C: float,
                    seed: int) -> np.ndarray:
    """Per-genre thresholds float32 [G] maximising F1 on out-of-fold probabilities of (X, genres).

    Only the given (training) items are used: ``CV_FOLDS``-fold CV, candidates ``THRESHOLD_GRID``.
    Ties go to the middle best candidate (on separable data: the middle of the margin).
    Genres with fewer than ``MIN_POSITIVES_TO_TUNE`` positives keep ``THRESHOLD``.
    """
    from sklearn.model_selection import KFold

    y = binarize(genres, labels)
    thresholds = np.full(len(labels), THRESHOLD, dtype=np.float32)
    if len(X) < 2 * CV_FOLDS:
        return thresholds
    oof = np.zeros(y.shape, dtype=np.float32)
    for fit_pos, out_pos in KFold(CV_FOLDS, shuffle=True, random_state=seed).split(X):
        clf = fit_classifier(X[fit_pos], [genres[i] for i in fit_pos], labels, C)
        oof[out_pos] = predict_proba(clf, X[out_pos])
    grid = np.asarray(THRESHOLD_GRID, dtype=np.float32)
    for j in range(len(labels)):
        pos = y[:, j].astype(bool)
        if pos.sum() < MIN_POSITIVES_TO_TUNE:
            continue
        hit = oof[:, j][:, None] >= grid[None, :]  # [n, T]
        tp = (hit & pos[:, None]).sum(axis=0)
        f1 = 2 * tp / np.maximum(hit.sum(axis=0) + pos.sum(), 1)
        best = np.flatnonzero(f1 >= f1.max() - 1e-9)  # ties: the middle of the best run
        thresholds[j] = grid[best[len(best) // 2]]
    return thresholds


def predict_proba(clf: Any, X: np.ndarray) -> np.ndarray:
    """Per-genre probabilities float32 [n, G] in [0, 1] (independent one-vs-rest sigmoids)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(BLAS_THREADS):
        probs = np.asarray(clf.predict_proba(X), dtype=np.float32).reshape(len(X), -1)
    if len(clf.estimators_) == 1 and probs.shape[1] == 2:  # one genre: sklearn sees a binary task
        probs = probs[:, 1:]
    return probs


def load_model(path: str | Path) -> dict:
    """The bundle written by this stage (``data/genre/model.joblib``)."""
    import joblib

    return joblib.load(path)


def predict_genres(bundle: dict, vectors: np.ndarray) -> tuple[list[list[str]], np.ndarray]:
    """Genres for L2-normalised feature vectors [n, d] -> (genre lists, probabilities [n, G]).

    Every list is non-empty (top-1 genre when none reaches the bundle's threshold). The vectors
    must be the bundle's features: :func:`predict_items` builds them from item rows.
    """
    vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, bundle["dim"])
    probs = predict_proba(bundle["classifier"], vectors)
    pred = decide(probs, np.asarray(bundle["thresholds"], dtype=np.float32))
    labels = bundle["labels"]
    return [[labels[j] for j in np.flatnonzero(row)] for row in pred], probs


def predict_items(bundle: dict, items: pd.DataFrame, batch_size: int = 64,
                  threads: int = 2) -> tuple[list[list[str]], np.ndarray]:
    """Genres for new items (rows holding the bundle's text columns; genres are never read).

    Encodes :func:`feature_texts` of the bundle's ``text_columns`` with its encoder settings (no
    cache) and applies :func:`predict_genres`. Bundles trained with ``text_columns: null`` read
    embed-stage vectors: use :func:`predict_genres` with those.
    """
    feats = bundle.get("features") or {}
    if feats.get("source") != "text":
        raise ValueError("this genre model reads the embed stage's vectors (text_columns: null); "
                         "use predict_genres with genre_tasks.features.embed.encode_texts(item texts)")
    absent = [c for c in feats["text_columns"] if c not in items.columns]
    if absent:
        raise ValueError(f"items lack the model's text column(s) {absent} (use None values for "
                         "unknown ones)")
    texts = feature_texts(items, feats["text_columns"])
    vectors = embed.encode_texts(texts, feats["model_path"], batch_size, feats["max_length"], threads)
    return predict_genres(bundle, vectors)


# --- features --------------------------------------------------------------------------------

def _value_text(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a year read as float: "1995", not "1995.0"
    if isinstance(value, (list, tuple, np.ndarray)):
        return " ".join(t for t in (_value_text(v) for v in value) if t)
    return " ".join(str(value).split())


def feature_texts(items: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """Per item, the non-empty values of ``columns`` (which must exist) joined with " "."""
    parts = [[_value_text(v) for v in items[c].astype(object)] for c in columns]
    return [" ".join(t for t in row if t) for row in zip(*parts)] if parts else [""] * len(items)


def genre_word_share(texts: Sequence[str], genres: Sequence[Sequence[str]]) -> float:
    """Share of the items with genres whose text names one of them (case-insensitive word match).

    ~1.0 = the genres are in the input (features leak the labels); titles alone give a few %.
    """
    hits = n = 0
    for text, gs in zip(texts, genres):
        if not gs:
            continue
        n += 1
        low = str(text).lower()
        hits += any(re.search(rf"(?<!\w){re.escape(g.lower())}(?!\w)", low) for g in gs)
    return round(hits / n, 4) if n else 0.0


def encode_cached(texts: Sequence[str], p: GenreParams, cache_root: Path,
                  log: logs.StageLog) -> tuple[np.ndarray, str]:
    """(unit vectors float32 [n, d] of ``texts``, model id) through the persistent text cache.

    Same recipe and cache as the embed stage (``EmbeddingCache`` keyed by the model id of
    (``p.model_path``, ``p.max_length``)): only texts missing from the cache are encoded.
    """
    mid = embed.model_id(p.model_path, p.max_length)
    cache = embed.EmbeddingCache(cache_root, mid)
    hashes = [io.text_sha1(t) for t in texts]
    unique = list(dict.fromkeys(hashes))
    text_of = dict(zip(hashes, texts))
    cached, found = cache.lookup(unique)
    log.read(cache.dir, f"{int(found.sum())}/{len(unique)} unique feature texts cached")
    new = None
    missing = [h for h, f in zip(unique, found) if not f]
    if missing:
        new = embed.encode_texts([text_of[h] for h in missing], p.model_path, p.batch_size,
                                 p.max_length, p.threads, False)
        log.wrote(cache.add(missing, new), f"cache shard, {len(missing)} vectors")
    dim = int(new.shape[1]) if new is not None else int(cached.shape[1])
    by_hash = np.zeros((len(unique), dim), dtype=np.float32)
    if cached is not None and found.any():
        if cached.shape[1] != dim:
            raise StageError(f"genre: embed cache {cache.dir}: dim {cached.shape[1]} != model dim {dim}")
        by_hash[found] = cached[found]
    if new is not None:
        by_hash[~found] = new
    pos = {h: i for i, h in enumerate(unique)}
    vectors = by_hash[[pos[h] for h in hashes]] if hashes else np.zeros((0, dim), np.float32)
    if len(vectors) and not np.all(np.abs(np.linalg.norm(vectors, axis=1) - 1.0) < 1e-3):
        raise StageError(f"genre: feature vectors are not unit-norm (corrupt cache {cache.dir}? "
                         "delete it and re-run)")
    return vectors, mid


# --- stage -----------------------------------------------------------------------------------

def _as_genres(value: Any) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return [str(g) for g in value if g is not None and str(g).strip()]


def _load_items(paths: Paths, log: logs.StageLog) -> pd.DataFrame:
    if not paths.items.exists():
        raise StageError(f"genre: {paths.items} not found; run the preprocess stage first")
    items = pd.read_parquet(paths.items)
    missing = [c for c in (S.ITEM_ID, S.ITEM_IDX, S.GENRES) if c not in items.columns]
    if missing:
        raise StageError(f"genre: {paths.items} has no column(s) {missing}; re-run preprocess")
    items = items.sort_values(S.ITEM_IDX, kind="stable").reset_index(drop=True)
    log.read(paths.items, f"{len(items)} items")
    items[S.GENRES] = [_as_genres(g) for g in items[S.GENRES]]
    return items


def _embed_vectors(paths: Paths, items: pd.DataFrame, log: logs.StageLog) -> np.ndarray:
    """The embed stage's vectors, checked to belong to exactly these items and texts."""
    for path in (paths.vectors, paths.vector_index):
        if not path.exists():
            raise StageError(f"genre: {path} not found; run the embed stage first "
                             "(genre.text_columns: null reads the embed stage's vectors)")
    vectors = np.load(paths.vectors).astype(np.float32, copy=False)
    index = pd.read_parquet(paths.vector_index)
    log.read(paths.vectors, f"{vectors.shape}")
    log.read(paths.vector_index)
    if (S.TEXT not in items.columns or vectors.ndim != 2 or len(vectors) != len(items)
            or len(index) != len(items)
            or not np.array_equal(index[S.ITEM_ID].astype(str).to_numpy(),
                                  items[S.ITEM_ID].astype(str).to_numpy())
            or not np.array_equal(index["text_hash"].to_numpy(),
                                  np.array([io.text_sha1(str(t)) for t in items[S.TEXT]], dtype=object))):
        raise StageError(f"genre: {paths.embeddings_dir} does not match {paths.items} (other items "
                         "or texts); re-run the embed stage")
    return vectors


def item_features(items: pd.DataFrame, p: GenreParams, paths: Paths,
                  log: logs.StageLog) -> tuple[np.ndarray, dict, float]:
    """(features float32 [n_items, d] in item_idx order, feature description, genre_in_text).

    ``p.text_columns`` set: the encoded :func:`feature_texts` of those columns (the ones the
    items have). None: the embed stage's vectors (leak the genres if its text contains them).
    """
    genres = items[S.GENRES].tolist()
    if p.text_columns is None:
        X = _embed_vectors(paths, items, log)
        share = genre_word_share(items[S.TEXT].astype(str).tolist(), genres)
        log.logger.warning("genre.text_columns is null: features = the embed stage's vectors of "
                           "'%s' (they leak the genres if that text contains them)", S.TEXT)
        return X, {"source": "embed", "text_columns": None, "model_path": None,
                   "max_length": None, "model_id": None}, share
    used = [c for c in dict.fromkeys(p.text_columns) if c in items.columns]
    absent = [c for c in dict.fromkeys(p.text_columns) if c not in items.columns]
    if not used:
        raise StageError(f"genre: none of genre.text_columns {list(p.text_columns)} is a column of "
                         f"{paths.items} (columns: {list(items.columns)})")
    if absent:
        log.logger.info("genre.text_columns %s: not in the items, skipped; features from %s",
                        absent, used)
    texts = feature_texts(items, used)
    n_empty = sum(not t for t in texts)
    if n_empty:
        log.logger.warning("%d item(s) have no %s value: empty feature text", n_empty, used)
    X, mid = encode_cached(texts, p, paths.embed_cache, log)
    share = genre_word_share(texts, genres)
    log.logger.info("features: %s joined (e.g. %r) -> %s", used, texts[0] if texts else "", X.shape)
    return X, {"source": "text", "text_columns": used, "model_path": p.model_path,
               "max_length": p.max_length, "model_id": mid}, share


def _split(n: int, test_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / held-out positions of n labelled items (both non-empty, sorted)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = min(max(int(round(test_frac * n)), 1), n - 1)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def evaluate(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> tuple[dict, dict]:
    """(micro/macro F1 summary, per-genre report); macro over genres present in ``y_true``."""
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    present = y_true.sum(axis=0) > 0
    micro = f1_score(y_true, y_pred, average="micro", zero_division=0)
    macro = (f1_score(y_true[:, present], y_pred[:, present], average="macro", zero_division=0)
             if present.any() else 0.0)
    prec, rec, f1, sup = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    per_genre = {g: {"support": int(sup[j]), "precision": round(float(prec[j]), 4),
                     "recall": round(float(rec[j]), 4), "f1": round(float(f1[j]), 4)}
                 for j, g in enumerate(labels)}
    return {"micro_f1": round(float(micro), 4), "macro_f1": round(float(macro), 4),
            "n_labels": int(present.sum())}, per_genre


def run(p: GenreParams, paths: Paths) -> dict:
    """Evaluate on held-out labelled items, refit on all of them, fill missing genres.

    Returns the metrics written to metrics/genre.json (see the module docstring).
    """
    import joblib
    import sklearn

    with logs.stage("genre", paths) as log:
        items = _load_items(paths, log)
        genres: list[list[str]] = items[S.GENRES].tolist()
        labelled = np.flatnonzero([len(g) > 0 for g in genres])
        counts = pd.Series([g for i in labelled for g in set(genres[i])], dtype=object).value_counts()
        labels = sorted(counts.index[counts >= p.min_support].astype(str).tolist())
        if len(labelled) < 2 or not labels:
            raise StageError(f"genre: {len(labelled)} labelled item(s) and no genre with >= "
                             f"{p.min_support} items (genre.min_support); nothing to learn")
        X, features, in_text = item_features(items, p, paths, log)
        if in_text > 0.5:
            log.logger.warning("%.0f%% of the labelled items name one of their own genres in the "
                               "classifier's input: held-out F1 is inflated (genre.text_columns)",
                               100 * in_text)
        dropped = sorted(set(counts.index.astype(str)) - set(labels))
        if dropped:
            log.logger.info("genres with < %d items not learned: %s", p.min_support, dropped)

        # 1. held-out evaluation (thresholds from CV on the train part only)
        tr, te = _split(len(labelled), p.test_frac, p.seed)
        train_idx, test_idx = labelled[tr], labelled[te]
        train_genres = [genres[i] for i in train_idx]
        clf = fit_classifier(X[train_idx], train_genres, labels, p.C)
        eval_thresholds = tune_thresholds(X[train_idx], train_genres, labels, p.C, p.seed)
        probs_test = predict_proba(clf, X[test_idx])
        y_true = binarize([genres[i] for i in test_idx], labels)
        scores, per_genre = evaluate(y_true, decide(probs_test, eval_thresholds), labels)
        fixed, _ = evaluate(y_true, decide(probs_test, THRESHOLD), labels)

        # 2. final model (+ thresholds) on all labelled items, applied to every item
        all_genres = [genres[i] for i in labelled]
        final = fit_classifier(X[labelled], all_genres, labels, p.C)
        thresholds = tune_thresholds(X[labelled], all_genres, labels, p.C, p.seed)
        bundle = {"classifier": final, "labels": labels, "thresholds": [round(float(t), 4) for t in thresholds],
                  "dim": int(X.shape[1]), "sklearn_version": sklearn.__version__,
                  "features": features}
        pred_lists, probs = predict_genres(bundle, X)
        has = np.array([len(g) > 0 for g in genres])
        top = probs.argmax(axis=1)
        predictions = pd.DataFrame({
            S.ITEM_ID: items[S.ITEM_ID].astype(str).to_numpy(),
            S.ITEM_IDX: items[S.ITEM_IDX].to_numpy(np.int32),
            S.GENRES: genres,
            "genres_pred": pred_lists,
            "genres_filled": [g if h else pl for g, h, pl in zip(genres, has, pred_lists)],
            "genres_source": np.where(has, "original", "predicted"),
            "top_genre": [labels[j] for j in top],
            "top_prob": probs[np.arange(len(probs)), top],
            "genre_probs": list(probs),
        })

        summary = {
            **scores,
            "micro_f1_t05": fixed["micro_f1"],
            "macro_f1_t05": fixed["macro_f1"],
            "n_train": len(train_idx),
            "n_test": len(test_idx),
            "n_labels_model": len(labels),
            "n_labelled": len(labelled),
            "n_filled": int((~has).sum()),
            "n_items": len(items),
            "genre_in_text": in_text,
            "dim": int(X.shape[1]),
        }
        with io.atomic_dir(paths.genre_dir) as tmp:
            with open(tmp / MODEL, "wb") as fh:
                joblib.dump(bundle, fh)
            predictions.to_parquet(tmp / PREDICTIONS, index=False)
            (tmp / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
            report = {
                "held_out": {**scores, "n_test": len(test_idx)},
                "per_genre": per_genre,
                "dropped_genres": dropped,
                "features": {**features, "genre_in_text": in_text},
                "thresholds_eval_model": {g: round(float(t), 4) for g, t in zip(labels, eval_thresholds)},
                "thresholds_final_model": {g: round(float(t), 4) for g, t in zip(labels, thresholds)},
            }
            (tmp / "eval.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        log.wrote(paths.genre_dir, f"model ({len(labels)} genres), predictions "
                                   f"({summary['n_filled']} items filled)")
        io.write_json(summary, paths.metrics("genre"))
        log.wrote(paths.metrics("genre"))
    return summary


def main(params: dict, paths: Paths) -> dict:
    """CLI/DAG entry point: ``run`` with the ``genre`` section of ``params``."""
    return run(config.section(GenreParams, "genre", params), paths)


__all__ = ["GenreParams", "binarize", "decide", "encode_cached", "evaluate", "feature_texts",
           "fit_classifier", "genre_word_share", "item_features", "load_model", "main",
           "predict_genres", "predict_items", "predict_proba", "run", "tune_thresholds"]
