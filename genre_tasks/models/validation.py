"""The validation metric every strategy is early-stopped and selected on (nDCG@10 on valid).

Torch-free; the metric functions are :mod:`genre_tasks.evaluation.metrics`'.
"""
from __future__ import annotations

import numpy as np

from genre_tasks.models.params import METRIC
from genre_tasks.models.views import EvalData, FitData


def eval_users(ev: EvalData) -> tuple[np.ndarray, list, np.ndarray | None]:
    """(users, targets, candidates) the early-stopping metric is computed on.

    cold_items split: the users with cold targets ranking only the cold items; else all
    evaluated users ranking the whole catalogue.
    """
    if ev.cold_items is not None:
        return ev.cold_users, ev.cold_targets, ev.cold_items
    return ev.users, ev.targets, None


def validation_ndcg(rec, fit: FitData, ev: EvalData, seed: int = 42, batch: int = 2048) -> float:
    """Mean nDCG@10 of ``rec`` on ``ev`` (seen items of ``fit`` excluded); NaN without users."""
    from genre_tasks.evaluation import metrics

    users, targets, candidates = eval_users(ev)
    if users is None or len(users) == 0:
        return float("nan")
    tie = metrics.tie_order(fit.n_items, seed)
    seen = fit.seen.tocsr()
    out = []
    for s in range(0, len(users), batch):
        u = users[s:s + batch]
        scores = rec.score([fit.histories[i] for i in u], fit)
        out.append(metrics.ranking_metrics(scores, targets[s:s + batch], tie=tie, exclude=seen[u],
                                           candidates=candidates)[METRIC])
    return float(np.mean(np.concatenate(out)))
