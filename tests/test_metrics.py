"""metrics: hand-computed ranking / impression examples, tie-breaking, reference implementations."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import sparse
from sklearn.metrics import roc_auc_score

from genre_tasks.evaluation import metrics as M

D = [1.0 / math.log2(i + 2) for i in range(30)]  # gain of a hit at 0-based rank i


def _scores_with_order(order: list[int], n_items: int) -> np.ndarray:
    """One row whose ranking is ``order`` (first = best), then the other items."""
    s = np.zeros(n_items)
    rest = [i for i in range(n_items) if i not in order]
    for rank, item in enumerate(order + rest):
        s[item] = n_items - rank
    return s[None, :]


def test_tie_order_is_a_seeded_permutation():
    t = M.tie_order(50, seed=7)
    assert sorted(t.tolist()) == list(range(50))
    assert np.array_equal(t, M.tie_order(50, seed=7))
    assert not np.array_equal(t, M.tie_order(50, seed=8))


def test_ranking_targets_at_known_ranks():
    n = 30
    tie = M.tie_order(n, 0)
    order = list(range(29, -1, -1))  # item 29 first, item 0 last
    s = _scores_with_order(order, n)
    # targets at 0-based ranks 0 and 2 -> items 29 and 27
    r = M.ranking_metrics(s, [np.array([29, 27])], tie=tie)
    assert r["ndcg@10"][0] == pytest.approx((D[0] + D[2]) / (D[0] + D[1]))
    assert r["recall@10"][0] == 1.0 and r["recall@20"][0] == 1.0
    assert r["mrr"][0] == 1.0 and r["hr@10"][0] == 1.0
    # targets at ranks 12 and 25 -> items 17 and 4: no top-10 hit, one top-20 hit
    r = M.ranking_metrics(s, [np.array([17, 4])], tie=tie)
    assert r["ndcg@10"][0] == 0.0 and r["recall@10"][0] == 0.0 and r["hr@10"][0] == 0.0
    assert r["recall@20"][0] == 0.5
    assert r["mrr"][0] == pytest.approx(1 / 13)
    # recall's denominator is the number of targets even above k; ideal DCG is capped at 10 hits
    many = np.array(order[:12])
    r = M.ranking_metrics(s, [many], tie=tie)
    assert r["recall@10"][0] == pytest.approx(10 / 12) and r["ndcg@10"][0] == pytest.approx(1.0)


def test_several_users_and_duplicate_targets():
    n = 15
    tie = M.tie_order(n, 1)
    s = np.vstack([_scores_with_order([3, 4, 5], n), _scores_with_order([9, 8], n)])
    r = M.ranking_metrics(s, [np.array([5, 5]), np.array([8])], tie=tie)
    assert r["ndcg@10"] == pytest.approx([D[2] / D[0], D[1] / D[0]])
    assert r["mrr"] == pytest.approx([1 / 3, 1 / 2])
    assert r["recall@10"].tolist() == [1.0, 1.0]


def test_excluded_items_leave_the_ranking():
    n = 30
    tie = M.tie_order(n, 0)
    order = list(range(n))  # item i at rank i
    s = _scores_with_order(order, n)
    # target at rank 10: a miss; excluding one item ranked above it makes it a top-10 hit
    assert M.ranking_metrics(s, [np.array([10])], tie=tie)["hr@10"][0] == 0.0
    seen = sparse.csr_matrix(([True], ([0], [3])), shape=(1, n))
    r = M.ranking_metrics(s, [np.array([10])], tie=tie, exclude=seen)
    assert r["hr@10"][0] == 1.0 and r["mrr"][0] == pytest.approx(1 / 10)
    # an excluded target cannot be hit but stays in the denominator
    seen = sparse.csr_matrix(([True], ([0], [0])), shape=(1, n))
    r = M.ranking_metrics(s, [np.array([0, 1])], tie=tie, exclude=seen)
    assert r["recall@10"][0] == 0.5 and r["mrr"][0] == pytest.approx(1.0)  # item 1 moved to rank 0
    assert r["ndcg@10"][0] == pytest.approx(D[0] / (D[0] + D[1]))


def test_candidates_rank_only_the_subset():
    n = 40
    tie = M.tie_order(n, 0)
    s = _scores_with_order(list(range(n)), n)  # item i at rank i overall
    cold = np.array([35, 20, 30, 25])  # among them: 20 first, 25, 30, 35
    r = M.ranking_metrics(s, [np.array([30])], tie=tie, candidates=cold)
    assert r["mrr"][0] == pytest.approx(1 / 3) and r["ndcg@10"][0] == pytest.approx(D[2])
    keys = M.tie_keys(0, [0], np.arange(n))
    assert M.ranking_metrics(s, [np.array([30])], tie=keys, candidates=cold)["mrr"][0] == pytest.approx(1 / 3)
    # a target outside the candidates cannot be hit
    r = M.ranking_metrics(s, [np.array([30, 1])], tie=tie, candidates=cold)
    assert r["recall@10"][0] == 0.5


def test_ties_follow_a_global_seeded_order_not_item_id():
    n = 200
    tie = M.tie_order(n, 42)
    ranks = M.rank_matrix(np.zeros((1, n)), tie)[0]
    assert np.array_equal(ranks, tie)  # constant scores: the tie order is the ranking
    assert not np.array_equal(ranks, np.arange(n))  # ... which is not the item id order
    # deterministic, and a different seed gives a different order
    assert np.array_equal(M.rank_matrix(np.zeros((1, n)), M.tie_order(n, 42))[0], ranks)
    assert not np.array_equal(M.rank_matrix(np.zeros((1, n)), M.tie_order(n, 43))[0], ranks)
    # ties only reorder equal scores: a strictly higher score still wins
    s = np.zeros((1, n))
    s[0, 123] = 1.0
    r = M.rank_matrix(s, tie)[0]
    assert r[123] == 0 and np.array_equal(np.argsort(r)[1:], np.argsort(tie)[np.argsort(tie) != 123])
    # with all-equal scores the metric of item 0 is not privileged
    first = int(np.argmin(tie))
    assert M.ranking_metrics(np.zeros((1, n)), [np.array([first])], tie=tie)["mrr"][0] == 1.0
    if first != 0:
        assert M.ranking_metrics(np.zeros((1, n)), [np.array([0])], tie=tie)["mrr"][0] < 1.0


def test_per_user_tie_keys_are_seeded_and_differ_across_users():
    n = 300
    users = np.array([0, 1, 2, 0])
    keys = M.tie_keys(42, users, np.arange(n))
    assert keys.shape == (4, n) and keys.dtype == np.uint64
    assert np.array_equal(keys, M.tie_keys(42, users, np.arange(n)))  # deterministic
    assert np.array_equal(keys[0], keys[3])  # a user's order is fixed
    assert not np.array_equal(np.argsort(keys[0]), np.argsort(keys[1]))  # ... and differs across users
    assert not np.array_equal(keys, M.tie_keys(43, users, np.arange(n)))
    assert all(len(np.unique(k)) == n for k in keys)
    # a subset of items keeps the same keys (cold-item ranking reuses the user's order)
    assert np.array_equal(M.tie_keys(42, [1], [5, 17])[0], keys[1, [5, 17]])
    ranks = M.rank_matrix(np.zeros((4, n)), keys)
    assert np.array_equal(ranks[0], np.argsort(np.argsort(keys[0])))
    assert not np.array_equal(ranks[0], np.arange(n)) and not np.array_equal(ranks[0], ranks[1])


def _reference_ranking(scores, targets, tie, seen):
    """Plain-python reference: sort by (-score, tie), drop seen, compute the metrics."""
    out = {k: [] for k in M.RANKING_METRICS}
    for row, tg in zip(range(len(scores)), targets):
        items = [i for i in sorted(range(scores.shape[1]), key=lambda i: (-scores[row, i], tie[row, i]))
                 if not seen[row, i]]
        tg = set(int(t) for t in tg)
        hits = [k for k, i in enumerate(items) if i in tg]
        dcg = sum(D[k] for k in hits if k < 10)
        idcg = sum(D[k] for k in range(min(len(tg), 10)))
        out["ndcg@10"].append(dcg / idcg)
        out["recall@10"].append(sum(k < 10 for k in hits) / len(tg))
        out["recall@20"].append(sum(k < 20 for k in hits) / len(tg))
        out["mrr"].append(1 / (hits[0] + 1) if hits else 0.0)
        out["hr@10"].append(float(bool(hits) and hits[0] < 10))
    return out


def test_ranking_matches_a_plain_reference_with_many_ties():
    rng = np.random.default_rng(3)
    n_users, n_items = 25, 60
    scores = rng.integers(0, 4, size=(n_users, n_items)).astype(np.float32)  # lots of ties
    seen = rng.random((n_users, n_items)) < 0.2
    targets = [rng.choice(n_items, size=rng.integers(1, 15), replace=False) for _ in range(n_users)]
    tie = M.tie_keys(5, np.arange(n_users), np.arange(n_items))
    got = M.ranking_metrics(scores, targets, tie=tie, exclude=sparse.csr_matrix(seen))
    ref = _reference_ranking(scores, targets, tie, seen)
    for k in M.RANKING_METRICS:
        assert got[k] == pytest.approx(ref[k]), k


@pytest.mark.parametrize("per_row", [False, True])
def test_target_ranks_agree_with_sorting(per_row):
    rng = np.random.default_rng(4)
    n, c = 12, 50
    scores = rng.integers(0, 3, size=(n, c)).astype(np.float64)
    scores[rng.random((n, c)) < 0.1] = -np.inf
    tie = M.tie_keys(1, np.arange(n), np.arange(c)) if per_row else M.tie_order(c, 1)
    full = M.rank_matrix(scores, tie)
    rows, cols = np.repeat(np.arange(n), c), np.tile(np.arange(c), n)
    assert np.array_equal(M.target_ranks(scores, tie, rows, cols, cells=97), full[rows, cols])


def test_nan_scores_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        M.ranking_metrics(np.full((1, 5), np.nan), [np.array([1])], tie=M.tie_order(5, 0))
    with pytest.raises(ValueError, match="at least one target"):
        M.ranking_metrics(np.zeros((1, 5)), [np.array([], dtype=int)], tie=M.tie_order(5, 0))


# --- impressions -------------------------------------------------------------------------------

def _recommenders_mrr(y_true, y_score):  # Microsoft Recommenders newsrec mrr_score
    order = np.argsort(y_score)[::-1]
    y_true = np.take(y_true, order)
    return np.sum(y_true / (np.arange(len(y_true)) + 1)) / np.sum(y_true)


def _recommenders_ndcg(y_true, y_score, k):  # Microsoft Recommenders newsrec ndcg_score
    def dcg(y_true, y_score):
        order = np.argsort(y_score)[::-1]
        y = np.take(y_true, order[:k])
        return np.sum((2 ** y - 1) / np.log2(np.arange(len(y)) + 2))
    return dcg(y_true, y_score) / dcg(y_true, y_true)


def test_impression_hand_example():
    r = M.impression_metrics([np.array([0.9, 0.8, 0.7, 0.6])], [np.array([0, 1, 0, 1])])
    assert r["mrr"][0] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert r["ndcg@5"][0] == pytest.approx((D[1] + D[3]) / (D[0] + D[1]))
    assert r["ndcg@10"][0] == pytest.approx(r["ndcg@5"][0])
    assert r["auc"][0] == pytest.approx(0.25)  # 1 of 4 positive-negative pairs ordered right


def test_impressions_match_recommenders_and_sklearn():
    rng = np.random.default_rng(0)
    scores, labels = [], []
    for _ in range(40):
        m = int(rng.integers(2, 30))
        y = (rng.random(m) < 0.3).astype(int)
        y[0], y[-1] = 1, 0
        scores.append(rng.normal(size=m))  # no ties: the reference's argsort order is unambiguous
        labels.append(y)
    r = M.impression_metrics(scores, labels)
    for j, (s, y) in enumerate(zip(scores, labels)):
        assert r["mrr"][j] == pytest.approx(_recommenders_mrr(y, s))
        assert r["ndcg@5"][j] == pytest.approx(_recommenders_ndcg(y, s, 5))
        assert r["ndcg@10"][j] == pytest.approx(_recommenders_ndcg(y, s, 10))
        assert r["auc"][j] == pytest.approx(roc_auc_score(y, s))


def test_impression_auc_counts_ties_as_half_and_rank_metrics_use_the_tie_order():
    s, y = np.array([1.0, 1.0, 1.0, 0.0]), np.array([1, 0, 0, 1])
    r = M.impression_metrics([s], [y], [np.array([3, 0, 1, 2])])
    assert r["auc"][0] == pytest.approx(roc_auc_score(y, s))  # = 0.5
    # order by (score desc, tie asc): item1 (tie 0), item2 (1), item0 (3), item3 -> positives at 3, 4
    assert r["mrr"][0] == pytest.approx((1 / 3 + 1 / 4) / 2)
    r2 = M.impression_metrics([s], [y], [np.array([0, 1, 2, 3])])
    assert r2["mrr"][0] == pytest.approx((1 + 1 / 4) / 2)


def test_impression_without_negative_has_no_auc():
    r = M.impression_metrics([np.array([0.2, 0.1])], [np.array([1, 1])])
    assert math.isnan(r["auc"][0]) and r["mrr"][0] == pytest.approx(0.75)


# --- summaries ---------------------------------------------------------------------------------

def test_summarize_means_standard_errors_and_counts():
    v = np.array([0.0, 1.0, 0.5, 0.5])
    out = M.summarize({"ndcg@10": v, "auc": np.array([1.0, np.nan, 0.0, 0.5])}, count_name="n_users")
    assert out["n_users"] == 4
    assert out["ndcg@10"] == pytest.approx(0.5)
    assert out["ndcg@10_se"] == pytest.approx(v.std(ddof=1) / 2)
    assert out["auc"] == pytest.approx(0.5)  # NaN left out
    assert out["auc_se"] == pytest.approx(np.std([1.0, 0.0, 0.5], ddof=1) / math.sqrt(3))
    single = M.summarize({"mrr": np.array([0.3])})
    assert single["mrr"] == pytest.approx(0.3) and math.isnan(single["mrr_se"]) and single["n"] == 1
    mixed = M.summarize({"a": np.zeros(2), "b": np.zeros(3)})
    assert mixed["a_n"] == 2 and mixed["b_n"] == 3 and "n" not in mixed
    assert math.isnan(M.summarize({"a": np.zeros(0)})["a"])
