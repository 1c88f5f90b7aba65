"""Ranking and impression metrics of the evaluation protocol, vectorised in numpy.

Spec: ../shared/notes/evaluation-protocol.md. Everything here is pure numpy (scipy only for
the sparse exclusion mask) and returns *per-unit* arrays (one value per user or impression), so
callers can average them, compute standard errors and run paired tests on the same units.

Ties: every ordering breaks score ties by a fixed pseudo-random item order, never by item id:
among equal scores the item with the lower tie key comes first. The evaluation uses
:func:`tie_keys`, a seeded hash of (seed, user, item): a fixed order per user, different across
users. With one global order instead (:func:`tie_order`), every model that cannot score some
items (all-equal scores, e.g. collaborative models on cold items) would share one lucky or
unlucky permutation for all users: on MovieLens-100k cold items a constant scorer's cold
nDCG@10 ranged 0.019-0.179 over 30 seeds with a global order, against 0.057 +- 0.004 for
per-user random orders.

Full ranking (:func:`ranking_metrics`), per user, targets = that user's positives:
``ndcg@10``   binary-gain nDCG at 10, in [0, 1] (ideal DCG over min(n_targets, 10) hits);
``recall@10`` / ``recall@20``  hits in the top k / number of targets, in [0, 1];
``mrr``       1 / (rank of the first target in the full list), in [0, 1] (0: no target rankable);
``hr@10``     1 if any target is in the top 10 else 0.

Impressions (:func:`impression_metrics`), per impression (item list + binary labels), exactly
as Microsoft Recommenders' ``mrr_score`` / ``ndcg_score`` but with the seeded tie order:
``auc``      ROC AUC in [0, 1], ties count 1/2 (= ``sklearn.metrics.roc_auc_score``);
``mrr``      sum over positives of 1/rank divided by the number of positives, in (0, 1];
``ndcg@5`` / ``ndcg@10``  binary-gain nDCG at k, in [0, 1].
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

RANKING_METRICS: tuple[str, ...] = ("ndcg@10", "recall@10", "recall@20", "mrr", "hr@10")
IMPRESSION_METRICS: tuple[str, ...] = ("auc", "mrr", "ndcg@5", "ndcg@10")

#: _DISCOUNT[i] = 1 / log2(i + 2): the gain of a hit at 0-based rank i
_DISCOUNT = 1.0 / np.log2(np.arange(2, 2 + 4096, dtype=np.float64))
_IDEAL = np.concatenate([[0.0], np.cumsum(_DISCOUNT)])  # _IDEAL[n] = DCG of n hits at the top


def tie_order(n_items: int, seed: int) -> np.ndarray:
    """One global seeded tie order [n_items] int64, a permutation of 0..n_items-1.

    ``tie[i] < tie[j]`` means item i is ranked before item j when their scores are equal.
    """
    return np.random.default_rng(seed).permutation(n_items).astype(np.int64)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 -> uint64, wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def tie_keys(seed: int, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Per-user seeded tie keys [len(users), len(items)] uint64 (lower key ranks first).

    A hash of (seed, user_idx, item_idx): the same for a user in every model and run, different
    across users and seeds, unrelated to the item id order.
    """
    with np.errstate(over="ignore"):
        s = _mix(np.array([seed], dtype=np.uint64) * _GOLDEN + np.uint64(1))
        u = _mix(s ^ (np.asarray(users, dtype=np.uint64).reshape(-1) * _GOLDEN + np.uint64(2)))
        i = np.asarray(items, dtype=np.uint64).reshape(-1) * _GOLDEN + np.uint64(3)
        return _mix(u[:, None] ^ i[None, :])


def rank_matrix(scores: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """0-based rank [N, C] int64 of every column in each row of ``scores`` [N, C].

    Sorted by score descending, ties by ascending ``tie`` ([C] for one order shared by all rows,
    or [N, C] per row; distinct integers within a row). ``-inf`` goes last; NaN is refused.
    """
    scores = np.asarray(scores)
    tie = np.asarray(tie)
    if scores.ndim != 2 or tie.shape[-1] != scores.shape[1] or (tie.ndim == 2 and tie.shape != scores.shape):
        raise ValueError(f"scores {scores.shape} do not match tie keys {tie.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    order = np.lexsort((np.broadcast_to(tie, scores.shape), -scores), axis=-1)
    ranks = np.empty(scores.shape, dtype=np.int64)
    np.put_along_axis(ranks, order, np.arange(scores.shape[1], dtype=np.int64)[None, :], axis=1)
    return ranks


def _flatten_targets(targets: Sequence[np.ndarray], n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row of each pair, item of each pair, n unique targets per row); duplicates removed."""
    if len(targets) != n_rows:
        raise ValueError(f"{len(targets)} target lists for {n_rows} score rows")
    lens = np.fromiter((len(t) for t in targets), dtype=np.int64, count=n_rows)
    if n_rows and lens.min() == 0:
        raise ValueError("every row needs at least one target")
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), lens)
    items = np.concatenate([np.asarray(t, dtype=np.int64) for t in targets]) if n_rows else np.zeros(0, np.int64)
    if len(items):
        width = int(items.max()) + 1
        key = np.unique(rows * width + items)
        rows, items = key // width, key % width
    return rows, items, np.bincount(rows, minlength=n_rows)


def ranking_metrics(scores: np.ndarray, targets: Sequence[np.ndarray], *, tie: np.ndarray,
                    exclude=None, candidates: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-row full-ranking metrics (``RANKING_METRICS``), each an array [N] float64.

    scores      [N, I] float, higher is better (one row per user).
    targets     N arrays of item_idx (in 0..I-1), each non-empty; duplicates are ignored.
    tie         tie keys over the whole catalogue: [N, I] per row (:func:`tie_keys`) or [I]
                shared by all rows (:func:`tie_order`); lower wins among equal scores.
    exclude     optional scipy sparse / bool array [N, I], rows aligned with ``scores``: items
                removed from the ranking (seen in the fit data). A target that is excluded (or
                outside ``candidates``) cannot be hit but still counts in the denominators.
    candidates  optional item_idx [C]: rank only these items (cold-item ranking).
    """
    scores = np.asarray(scores)
    n, n_items = scores.shape
    tie = np.asarray(tie)
    if tie.shape[-1] != n_items or (tie.ndim == 2 and tie.shape[0] != n):
        raise ValueError(f"scores {scores.shape} do not match tie keys {tie.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    rows, items, lens = _flatten_targets(targets, n)
    if len(items) and (items.min() < 0 or items.max() >= n_items):
        raise ValueError("target item_idx out of range")
    removed = np.zeros(scores.shape, dtype=bool)
    if exclude is not None:
        if exclude.shape != scores.shape:
            raise ValueError(f"exclude {exclude.shape} does not match scores {scores.shape}")
        removed = (exclude.toarray() if hasattr(exclude, "toarray") else np.asarray(exclude)).astype(bool)
    blocked = removed[rows, items]
    if candidates is not None:
        candidates = np.asarray(candidates, dtype=np.int64)
        position = np.full(n_items, -1, dtype=np.int64)
        position[candidates] = np.arange(len(candidates))
        scores, removed, tie = scores[:, candidates], removed[:, candidates], tie[..., candidates]
        cols = position[items]
        blocked |= cols < 0
    else:
        cols = items
    r = np.full(len(items), np.inf)
    ok = np.flatnonzero(~blocked)
    r[ok] = target_ranks(scores, tie, rows[ok], cols[ok], removed)
    return metrics_from_ranks(rows, r, lens)


def target_ranks(scores: np.ndarray, tie: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                 removed: np.ndarray | None = None, cells: int = 2 ** 22) -> np.ndarray:
    """0-based rank [P] int64 of column ``cols[p]`` in row ``rows[p]`` of ``scores`` [N, C].

    rank = number of items of the row ordered before it: a higher score, or an equal score and
    a lower tie key (``tie`` [C] or [N, C]); items flagged in ``removed`` [N, C] do not count.
    Same ranks as :func:`rank_matrix` restricted to the remaining items, without sorting rows
    (the work is [P, C] comparisons, done in chunks of about ``cells``).
    """
    out = np.empty(len(rows), dtype=np.int64)
    step = max(1, cells // max(scores.shape[1], 1))
    for lo in range(0, len(rows), step):
        r, c = rows[lo:lo + step], cols[lo:lo + step]
        idx = np.arange(len(r))
        s = scores[r]
        k = tie[r] if tie.ndim == 2 else tie[None, :]
        kt = k[idx, c] if tie.ndim == 2 else tie[c]
        st = s[idx, c]
        ahead = (s > st[:, None]) | ((s == st[:, None]) & (k < kt[:, None]))
        if removed is not None:
            ahead &= ~removed[r]
        out[lo:lo + step] = ahead.sum(axis=1)
    return out


def metrics_from_ranks(rows: np.ndarray, ranks: np.ndarray, lens: np.ndarray) -> dict[str, np.ndarray]:
    """Full-ranking metrics from the 0-based rank of every (row, target) pair.

    rows [P] row of each pair, ranks [P] float (``inf`` = not rankable), lens [N] targets per row.
    """
    n = len(lens)
    lens_f = lens.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        hit10 = ranks < 10
        gains = np.where(hit10, _DISCOUNT[np.where(hit10, ranks, 0).astype(np.int64)], 0.0)
        dcg = np.bincount(rows, weights=gains, minlength=n)
        idcg = _IDEAL[np.minimum(lens, 10)]
        first = np.full(n, np.inf)
        np.minimum.at(first, rows, ranks)
        return {
            "ndcg@10": dcg / idcg,
            "recall@10": np.bincount(rows, weights=hit10.astype(np.float64), minlength=n) / lens_f,
            "recall@20": np.bincount(rows, weights=(ranks < 20).astype(np.float64), minlength=n) / lens_f,
            "mrr": 1.0 / (first + 1.0),
            "hr@10": (first < 10).astype(np.float64),
        }


def impression_metrics(scores: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                       ties: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per-impression metrics (``IMPRESSION_METRICS``), each an array [M] float64.

    scores    M arrays [m_j] of scores of the impression's items (higher is better).
    labels    M arrays [m_j] in {0, 1}; impressions without a positive give NaN for every
              metric, without a negative NaN AUC.
    ties      M arrays [m_j] of tie keys of the items (lower first among equal scores), e.g.
              ``tie_keys(seed, [user], items)[0]``; default: the order within the list.
    """
    m = len(scores)
    if len(labels) != m or (ties is not None and len(ties) != m):
        raise ValueError("scores, labels and ties must have one entry per impression")
    out = {k: np.zeros(0) for k in IMPRESSION_METRICS}
    if m == 0:
        return out
    lens = np.fromiter((len(s) for s in scores), dtype=np.int64, count=m)
    g = np.repeat(np.arange(m, dtype=np.int64), lens)
    s = np.concatenate([np.asarray(x, dtype=np.float64) for x in scores])
    y = np.concatenate([np.asarray(x, dtype=np.float64) for x in labels])
    if len(y) != len(s):
        raise ValueError("each impression needs one label per score")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    t = (np.concatenate([np.asarray(x) for x in ties]) if ties is not None
         else np.arange(len(s), dtype=np.int64))
    start = np.concatenate([[0], np.cumsum(lens)[:-1]])
    n_pos = np.bincount(g, weights=y, minlength=m)
    n_neg = lens - n_pos

    # position within the impression after sorting by score desc, tie key asc
    order = np.lexsort((t, -s, g))
    pos = np.arange(len(s)) - start[g[order]]
    y_sorted, g_sorted = y[order], g[order]
    with np.errstate(divide="ignore", invalid="ignore"):
        rr = np.bincount(g_sorted, weights=y_sorted / (pos + 1.0), minlength=m)
        out["mrr"] = np.where(n_pos > 0, rr / n_pos, np.nan)
        for k in (5, 10):
            top = pos < k
            disc = np.where(top, _DISCOUNT[np.minimum(pos, len(_DISCOUNT) - 1)], 0.0)
            dcg = np.bincount(g_sorted, weights=y_sorted * disc, minlength=m)
            ideal = _IDEAL[np.minimum(n_pos.astype(np.int64), k)]
            out[f"ndcg@{k}"] = np.where(n_pos > 0, dcg / ideal, np.nan)

        # AUC = Mann-Whitney U with average ranks for tied scores
        asc = np.lexsort((s, g))
        sa, ga, ya = s[asc], g[asc], y[asc]
        new_run = np.ones(len(sa), dtype=bool)
        new_run[1:] = (ga[1:] != ga[:-1]) | (sa[1:] != sa[:-1])
        run = np.cumsum(new_run) - 1
        one_based = (np.arange(len(sa)) - start[ga] + 1).astype(np.float64)
        avg = np.bincount(run, weights=one_based) / np.bincount(run)
        rank_sum = np.bincount(ga, weights=ya * avg[run], minlength=m)
        auc = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
        out["auc"] = np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)
    return out


def standard_error(values: np.ndarray) -> float:
    """std(ddof=1) / sqrt(n) of the finite values; NaN with fewer than two."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return float("nan")
    return float(v.std(ddof=1) / np.sqrt(len(v)))


def summarize(per_user: Mapping[str, np.ndarray], count_name: str | None = "n") -> dict[str, float]:
    """Means and standard errors of per-unit metric arrays.

    Returns ``{metric: mean, f"{metric}_se": standard error}`` for every key (NaN values, e.g.
    an impression without a negative for AUC, are left out of that metric; an empty array gives
    NaN) plus the number of units: ``{count_name: n}`` when every array has the same length,
    else ``{f"{metric}_n": n}`` per metric (``count_name=None``: no counts).
    """
    out: dict[str, float] = {}
    sizes = {len(v) for v in per_user.values()}
    if count_name is not None and len(sizes) <= 1:
        out[count_name] = int(sizes.pop()) if sizes else 0
    for name, values in per_user.items():
        v = np.asarray(values, dtype=np.float64)
        if count_name is not None and len(sizes) > 1:
            out[f"{name}_n"] = int(len(v))
        v = v[np.isfinite(v)]
        out[name] = float(v.mean()) if len(v) else float("nan")
        out[f"{name}_se"] = standard_error(v)
    return out
