"""Baseline recommenders of the evaluation protocol, each a :class:`data.Recommender`.

``Random``       seeded uniform scores;
``MostPop``      positives per item in the fit rows (``FitData.popularity``);
``ItemKNN``      item-item cosine on the binarised positives, top-k neighbours per item
                 (Deshpande & Karypis 2004): score(u, j) = sum_{i in hist(u)} sim_k(i, j);
``EASE``         Steck 2019, closed form: G = X^T X + lambda I, P = G^-1,
                 B = -P / diag(P) (column-wise), diag(B) = 0, score(u) = x_u B;
``ContentMean``  user vector = mean of the language-model vectors of the user's positive
                 history, cosine with every item vector.

All of them score from the ``histories`` they are given (binary row vectors built from the
item_idx lists), not from the fit users, so a fitted baseline scores new users too. Memory is
bounded by working in blocks of items (ItemKNN: at most ``ItemKNN.block_cells`` dense cells
per block) and of users (scoring); EASE needs a dense
[I, I] float64 matrix and refuses catalogues above ``EASE.max_items``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse

from genre_tasks.models.views import FitData

#: users scored per block inside ``score`` (bounds the temporaries, not the [n, I] result)
SCORE_BLOCK = 2048


def history_matrix(histories: Sequence[np.ndarray], n_items: int) -> sparse.csr_matrix:
    """Binary csr [len(histories), n_items] float32: 1 where the item is in the history."""
    lens = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    rows = np.repeat(np.arange(len(histories), dtype=np.int64), lens)
    cols = (np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
            if len(histories) else np.zeros(0, np.int64))
    if len(cols) and (cols.min() < 0 or cols.max() >= n_items):
        raise ValueError(f"history item_idx out of range [0, {n_items})")
    m = sparse.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(len(histories), n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def score_blocks(histories: Sequence[np.ndarray], n_items: int, fn) -> np.ndarray:
    """Scores [len(histories), n_items] float32, ``fn(history_matrix block) -> dense scores``
    applied to blocks of SCORE_BLOCK users (bounds the temporaries)."""
    out = np.empty((len(histories), n_items), dtype=np.float32)
    for lo in range(0, len(histories), SCORE_BLOCK):
        h = history_matrix(histories[lo:lo + SCORE_BLOCK], n_items)
        out[lo:lo + h.shape[0]] = fn(h)
    return out


def _check(data: FitData, n_items: int | None, name: str) -> None:
    if n_items is None:
        raise RuntimeError(f"{name}: score() before fit()")
    if data.n_items != n_items:
        raise ValueError(f"{name}: fitted on {n_items} items, asked to score {data.n_items}")


class Random:
    """Uniform random scores in [0, 1); the generator is seeded at ``fit`` (deterministic for
    the same sequence of ``score`` calls)."""

    name = "Random"

    def __init__(self, seed: int = 42) -> None:
        self.seed = seed
        self.n_items: int | None = None

    def fit(self, data: FitData) -> "Random":
        self.n_items = data.n_items
        self._rng = np.random.default_rng(self.seed)
        return self

    def score(self, histories: Sequence[np.ndarray], data: FitData) -> np.ndarray:
        _check(data, self.n_items, self.name)
        return self._rng.random((len(histories), data.n_items), dtype=np.float32)


class MostPop:
    """Item popularity (positives in the fit rows), the same list for every user."""

    name = "MostPop"

    def __init__(self) -> None:
        self.n_items: int | None = None

    def fit(self, data: FitData) -> "MostPop":
        self.n_items = data.n_items
        self.popularity = np.asarray(data.popularity, dtype=np.float32)
        return self

    def score(self, histories: Sequence[np.ndarray], data: FitData) -> np.ndarray:
        _check(data, self.n_items, self.name)
        return np.broadcast_to(self.popularity, (len(histories), data.n_items)).copy()


class ItemKNN:
    """Item-item cosine on binarised positives, keeping the ``k`` most similar items per
    candidate item (the standard rule).

    ``sim(i, j) = |U_i & U_j| / sqrt(|U_i| |U_j|)`` (U_i = users with a positive on i),
    sim(i, i) = 0. :attr:`neighbours` row j keeps candidate j's k largest positive similarities;
    a user's score for j sums ``neighbours[j, i]`` over the history items i, so only j's own
    k nearest items count (pruning per history item instead, as this class did before, is a
    weaker variant). :attr:`similarity` is its
    transpose, laid out [history item, candidate] for scoring.
    """

    name = "ItemKNN"

    #: dense cells [block items, I] of one co-occurrence block (2**24: 64 MiB float32, as much
    #: again for the top-k's negated copy, twice that for its int64 indices): 1,024 items per
    #: block at 16,820 items, 99 at 168,200
    block_cells = 2 ** 24

    def __init__(self, k: int = 50, block: int = 1024) -> None:
        if k < 1:
            raise ValueError(f"ItemKNN: k must be >= 1, got {k}")
        self.k = int(k)
        self.block = block
        self.n_items: int | None = None

    def fit(self, data: FitData) -> "ItemKNN":
        x = sparse.csr_matrix(data.positives, dtype=np.float32)
        x.data[:] = 1.0
        n_items = x.shape[1]
        xt = x.T.tocsr()
        norm = np.sqrt(np.asarray(x.sum(axis=0)).ravel()).astype(np.float32)
        inv = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
        k = min(self.k, max(n_items - 1, 1))
        # memory is bounded by the block (block x I dense cells), not by the catalogue; time is
        # still the items x items co-occurrence (one pass over each user's positives squared)
        block = max(1, min(self.block, self.block_cells // max(n_items, 1)))
        rows, cols, vals = [], [], []
        for lo in range(0, n_items, block):
            hi = min(lo + block, n_items)
            sim = (xt[lo:hi] @ x).toarray()  # [b, I] co-occurrence counts
            sim *= inv[lo:hi, None]
            sim *= inv[None, :]
            sim[np.arange(hi - lo), np.arange(lo, hi)] = 0.0
            if k < n_items:
                top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            else:
                top = np.broadcast_to(np.arange(n_items), (hi - lo, n_items))
            v = np.take_along_axis(sim, top, axis=1)
            keep = v > 0
            rows.append(np.broadcast_to(np.arange(lo, hi)[:, None], top.shape)[keep])
            cols.append(top[keep])
            vals.append(v[keep])
        self.neighbours = sparse.csr_matrix(
            (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
            shape=(n_items, n_items))
        self.similarity = self.neighbours.T.tocsr()
        self.n_items = n_items
        return self

    def score(self, histories: Sequence[np.ndarray], data: FitData) -> np.ndarray:
        _check(data, self.n_items, self.name)
        return score_blocks(histories, data.n_items, lambda h: (h @ self.similarity).toarray())


class EASE:
    """Embarrassingly Shallow Autoencoder (Steck 2019), closed form with L2 weight ``lam``."""

    name = "EASE"
    #: a dense [I, I] float64 Gram matrix and its inverse must fit in memory
    max_items = 20_000

    def __init__(self, lam: float = 250.0) -> None:
        if lam <= 0:
            raise ValueError(f"EASE: lambda must be > 0, got {lam}")
        self.lam = float(lam)
        self.n_items: int | None = None

    @staticmethod
    def closed_form(x, lam: float) -> np.ndarray:
        """Item-item weights B [I, I] float64 for the binary user-item matrix ``x`` [U, I]."""
        x = sparse.csr_matrix(x, dtype=np.float64)
        g = (x.T @ x).toarray()
        g[np.diag_indices_from(g)] += lam
        p = spd_inverse(g)
        b = p / (-np.diag(p))[None, :]
        b[np.diag_indices_from(b)] = 0.0
        return b

    def fit(self, data: FitData) -> "EASE":
        if data.n_items > self.max_items:
            raise ValueError(f"EASE: {data.n_items:,} items need a dense {data.n_items:,}^2 inverse; "
                             f"more than EASE.max_items={self.max_items:,} (drop 'ease' from evaluate.baselines)")
        x = sparse.csr_matrix(data.positives, dtype=np.float64)
        x.data[:] = 1.0
        self.weights = self.closed_form(x, self.lam).astype(np.float32)
        self.n_items = data.n_items
        return self

    def score(self, histories: Sequence[np.ndarray], data: FitData) -> np.ndarray:
        _check(data, self.n_items, self.name)
        return score_blocks(histories, data.n_items, lambda h: h @ self.weights)


def spd_inverse(g: np.ndarray) -> np.ndarray:
    """Inverse of the symmetric positive definite ``g`` through its Cholesky factor
    (LAPACK potrf + potri): 1.6x faster than ``np.linalg.inv``'s LU on EASE's Gram + lambda I
    (0.18 vs 0.30 s for 1,682 items here). Falls back to ``np.linalg.inv`` if ``g`` is not numerically
    positive definite."""
    from scipy.linalg import lapack

    c, info = lapack.dpotrf(g, lower=False, clean=True)  # clean: the lower triangle zeroed
    if info == 0:
        inv, info = lapack.dpotri(c, lower=False, overwrite_c=True)  # the upper triangle of g^-1
    if info != 0:
        return np.linalg.inv(g)
    full = inv + inv.T
    full[np.diag_indices_from(full)] *= 0.5
    return full


class ContentMean:
    """Content-only: cosine between the mean positive-history item vector and every item.

    Users with an empty history get all-zero scores (the tie order decides).
    """

    name = "ContentMean"

    def __init__(self) -> None:
        self.n_items: int | None = None

    def fit(self, data: FitData) -> "ContentMean":
        v = np.asarray(data.item_vectors, dtype=np.float32)
        if v.ndim != 2 or len(v) != data.n_items:
            raise ValueError(f"ContentMean: item_vectors {v.shape} do not match {data.n_items} items")
        norm = np.linalg.norm(v, axis=1, keepdims=True)
        self.vectors = np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)
        self.n_items = data.n_items
        return self

    def score(self, histories: Sequence[np.ndarray], data: FitData) -> np.ndarray:
        _check(data, self.n_items, self.name)

        def cosine(h):
            user = np.asarray(h @ self.vectors)  # sum of history vectors (the mean, up to scale)
            norm = np.linalg.norm(user, axis=1, keepdims=True)
            user = np.divide(user, norm, out=np.zeros_like(user), where=norm > 0)
            return user @ self.vectors.T

        return score_blocks(histories, data.n_items, cosine)


#: params.yaml ``evaluate.baselines`` key -> class
BASELINES: dict[str, type] = {"random": Random, "mostpop": MostPop, "itemknn": ItemKNN,
                              "ease": EASE, "content": ContentMean}
#: baselines with a hyperparameter tuned on the validation phase: key -> constructor argument
TUNED: dict[str, str] = {"itemknn": "k", "ease": "lam"}


def make_baseline(key: str, seed: int = 42, **hyperparameters):
    """An unfitted baseline by its params key (``random`` takes the seed)."""
    if key not in BASELINES:
        raise ValueError(f"unknown baseline {key!r}; known: {sorted(BASELINES)}")
    if key == "random":
        return Random(seed=seed, **hyperparameters)
    return BASELINES[key](**hyperparameters)
