"""The validation metric every strategy is early-stopped and selected on (nDCG@10 on valid).

Torch-free; the metric functions are :mod:`genre_tasks.evaluation.metrics`'.
"""
from __future__ import annotations

import numpy as np

from genre_tasks.models.params import METRIC
from genre_tasks.models.views import EvalData, FitData, scoring_session


def eval_users(ev: EvalData) -> tuple[np.ndarray, list, np.ndarray | None]:
    """(users, targets, candidates) the early-stopping metric is computed on.

    cold_items split: the users with cold targets ranking only the cold items; else all
    evaluated users ranking the whole catalogue.
    """
    if ev.cold_items is not None:
        return ev.cold_users, ev.cold_targets, ev.cold_items
    return ev.users, ev.targets, None


#: score cells [users, items] per batch of :func:`validation_ndcg` (2**23 float32 = 32 MiB; the
#: same bound as evaluate's protocol.BATCH_CELLS): 2,048 users at 1,682 items, 49 at 168,200
BATCH_CELLS = 2 ** 23


def validation_ndcg(rec, fit: FitData, ev: EvalData, seed: int = 42, batch: int = 2048) -> float:
    """Mean nDCG@10 of ``rec`` on ``ev`` (seen items of ``fit`` excluded); NaN without users.

    Users are scored ``batch`` at a time, fewer on a big catalogue (at most :data:`BATCH_CELLS`
    score cells per batch); the result does not depend on the batch size."""
    from genre_tasks.evaluation import metrics

    users, targets, candidates = eval_users(ev)
    if users is None or len(users) == 0:
        return float("nan")
    batch = max(1, min(batch, BATCH_CELLS // max(fit.n_items, 1)))
    tie = metrics.tie_order(fit.n_items, seed)
    seen = fit.seen.tocsr()
    out = []
    with scoring_session(rec, fit):
        for s in range(0, len(users), batch):
            u = users[s:s + batch]
            scores = rec.score([fit.histories[i] for i in u], fit)
            out.append(metrics.ranking_metrics(scores, targets[s:s + batch], tie=tie, exclude=seen[u],
                                               candidates=candidates)[METRIC])
    return float(np.mean(np.concatenate(out)))
