"""Score any :class:`data.Recommender` on a phase with the protocol's metrics; tune on valid.

:func:`evaluate_recommender` computes, from the model's scores for each evaluated user:

full ranking over ``ev.users`` (seen items of the fit data excluded, targets = positives)
    ``ndcg@10``, ``recall@10``, ``recall@20``, ``mrr``, ``hr@10``
impressions ``ev.impressions`` (only the impression's items are scored, nothing excluded)
    ``auc``, ``imp_mrr``, ``imp_ndcg@5``, ``imp_ndcg@10``
cold items (only when ``ev.cold_items`` is set: rank only ``ev.cold_items`` for ``ev.cold_users``)
    ``cold_ndcg@10``, ``cold_recall@10``, ``cold_recall@20``, ``cold_mrr``

Every metric is a mean over its units (users, impressions, cold users) with its standard error
(``<metric>_se``) and the unit counts ``n_users``, ``n_impressions``, ``n_cold_users``. The
per-unit values are kept (``EvalResult.per_user``) with the aligned ``user_idx``
(``EvalResult.users``) so that two models can be compared with a paired test on the same units.
Ties are broken by a seeded pseudo-random item order per user (:func:`metrics.tie_keys`), the
same for every model, so models that give equal scores are compared on equal terms.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from genre_tasks.models import views as D
from genre_tasks.evaluation import metrics as M

FULL_METRICS: tuple[str, ...] = M.RANKING_METRICS
IMPRESSION_METRICS: tuple[str, ...] = ("auc", "imp_mrr", "imp_ndcg@5", "imp_ndcg@10")
COLD_METRICS: tuple[str, ...] = ("cold_ndcg@10", "cold_recall@10", "cold_recall@20", "cold_mrr")
#: unit group of each metric -> (metric names, count key in EvalResult.metrics)
GROUPS: dict[str, tuple[tuple[str, ...], str]] = {
    "full": (FULL_METRICS, "n_users"),
    "impression": (IMPRESSION_METRICS, "n_impressions"),
    "cold": (COLD_METRICS, "n_cold_users"),
}
_IMP_NAMES = dict(zip(M.IMPRESSION_METRICS, IMPRESSION_METRICS))  # metrics.py name -> ours
#: users scored per ``rec.score`` call: at most 1024 and about 2**23 score cells per batch
#: (bounds the [batch, n_items] score, tie-key and rank matrices)
BATCH_USERS = 1024
BATCH_CELLS = 2 ** 23


@dataclass
class EvalResult:
    """Metrics of one model on one phase.

    metrics   {metric: mean, f"{metric}_se": standard error, "n_users", "n_impressions",
              "n_cold_users"} (cold metrics only in the cold_items split).
    per_user  {metric: [units] float64} per-unit values (users / impressions / cold users).
    users     {metric: [units] int64} the user_idx of each unit, aligned with ``per_user``.
    """

    name: str
    metrics: dict[str, float]
    per_user: dict[str, np.ndarray] = field(default_factory=dict)
    users: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0

    def frame(self) -> pd.DataFrame:
        """Per-unit values, long over unit groups: model, group ("full" | "impression" |
        "cold"), user_idx, impression (ordinal in ``ev.impressions``, -1 for user groups) and
        one column per metric (NaN where the metric belongs to another group)."""
        parts = []
        for group, (names, _) in GROUPS.items():
            present = [m for m in names if m in self.per_user]
            if not present:
                continue
            users = self.users[present[0]]
            part = pd.DataFrame({
                "model": self.name, "group": group, "user_idx": users.astype(np.int64),
                "impression": (np.arange(len(users), dtype=np.int64) if group == "impression"
                               else np.full(len(users), -1, dtype=np.int64))})
            for m in present:
                part[m] = self.per_user[m]
            parts.append(part)
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def score_users(rec: D.Recommender, fit: D.FitData, users: np.ndarray) -> np.ndarray:
    """``rec.score`` for ``users`` (their fit histories), checked: [len(users), I], no NaN."""
    s = np.asarray(rec.score([fit.histories[u] for u in users], fit))
    if s.shape != (len(users), fit.n_items):
        raise ValueError(f"{rec.name}: score() returned {s.shape}, expected {(len(users), fit.n_items)}")
    if np.isnan(s).any():
        raise ValueError(f"{rec.name}: score() returned NaN")
    return s


def evaluate_recommender(rec: D.Recommender, fit: D.FitData, ev: D.EvalData, seed: int,
                         batch_users: int | None = None) -> EvalResult:
    """Evaluate a fitted ``rec`` on ``ev`` (see the module docstring for the metrics).

    ``seed`` fixes the tie-breaking order; ``batch_users`` users are scored per ``rec.score``
    call (default: :data:`BATCH_USERS`, fewer for large catalogues). Results do not depend on it.
    """
    started = time.perf_counter()
    if batch_users is None:
        batch_users = max(1, min(BATCH_USERS, BATCH_CELLS // max(fit.n_items, 1)))
    all_items = np.arange(fit.n_items)
    seen = fit.seen.tocsr()
    users = np.asarray(ev.users, dtype=np.int64)
    imp_users = np.asarray([u for u, _, _ in ev.impressions], dtype=np.int64)
    cold = ev.cold_items is not None
    cold_users = np.asarray(ev.cold_users if cold else [], dtype=np.int64)
    everyone = np.unique(np.concatenate([users, imp_users, cold_users]))

    full = {m: np.full(len(users), np.nan) for m in FULL_METRICS}
    imp = {m: np.full(len(imp_users), np.nan) for m in IMPRESSION_METRICS}
    cmet = {m: np.full(len(cold_users), np.nan) for m in COLD_METRICS}
    with D.scoring_session(rec, fit):  # e.g. a two-tower's item tower once, not per batch
        for lo in range(0, len(everyone), batch_users):
            batch = everyone[lo:lo + batch_users]
            scores = score_users(rec, fit, batch)
            tie = M.tie_keys(seed, batch, all_items)  # [batch, I]

            sel = np.flatnonzero(np.isin(users, batch))
            if len(sel):
                rows = np.searchsorted(batch, users[sel])
                res = M.ranking_metrics(scores[rows], [ev.targets[i] for i in sel], tie=tie[rows],
                                        exclude=seen[users[sel]])
                for m in FULL_METRICS:
                    full[m][sel] = res[m]

            sel = np.flatnonzero(np.isin(imp_users, batch))
            if len(sel):
                rows = np.searchsorted(batch, imp_users[sel])
                items = [ev.impressions[i][1] for i in sel]
                res = M.impression_metrics([scores[r, it] for r, it in zip(rows, items)],
                                           [ev.impressions[i][2] for i in sel],
                                           [tie[r, it] for r, it in zip(rows, items)])
                for src, dst in _IMP_NAMES.items():
                    imp[dst][sel] = res[src]

            if cold and len(cold_users):
                sel = np.flatnonzero(np.isin(cold_users, batch))
                if len(sel):
                    rows = np.searchsorted(batch, cold_users[sel])
                    res = M.ranking_metrics(scores[rows], [ev.cold_targets[i] for i in sel], tie=tie[rows],
                                            exclude=seen[cold_users[sel]], candidates=ev.cold_items)
                    for m in COLD_METRICS:
                        cmet[m][sel] = res[m.removeprefix("cold_")]

    metrics = {**M.summarize(full, "n_users"), **M.summarize(imp, "n_impressions")}
    per_user = {**full, **imp}
    unit_users = {**{m: users for m in FULL_METRICS}, **{m: imp_users for m in IMPRESSION_METRICS}}
    if cold:
        metrics.update(M.summarize(cmet, "n_cold_users"))
        per_user.update(cmet)
        unit_users.update({m: cold_users for m in COLD_METRICS})
    return EvalResult(name=rec.name, metrics=metrics, per_user=per_user, users=unit_users,
                      seconds=time.perf_counter() - started)


def _phase(dataset: Any, phase: D.Phase) -> tuple[D.FitData, D.EvalData]:
    """Accept a :class:`data.Dataset` (cut ``phase``) or an already cut (FitData, EvalData)."""
    if isinstance(dataset, D.Dataset):
        return dataset.phase(phase)
    fit, ev = dataset
    if fit.phase != phase or ev.phase != phase:
        raise ValueError(f"expected {phase}-phase data, got fit={fit.phase} eval={ev.phase}")
    return fit, ev


def selection_metric(ev: D.EvalData, metric: str = "ndcg@10") -> str:
    """The metric tuning maximises: in the cold_items split the cold version of ``metric``."""
    if ev.cold_items is not None and not metric.startswith("cold_") and f"cold_{metric}" in COLD_METRICS:
        return f"cold_{metric}"
    return metric


def tune(make: Callable[[Any], D.Recommender], grid: Iterable[Any], dataset: Any,
         metric: str = "ndcg@10", seed: int = 42) -> tuple[Any, list[dict]]:
    """Fit ``make(value)`` on the valid phase for each grid value; pick the best valid metric.

    ``dataset`` is a :class:`data.Dataset` or the cut valid phase ``(FitData, EvalData)``.
    In the cold_items split the cold version of ``metric`` is maximised. Ties keep the first
    grid value. Returns ``(best value, table)``; the table has one row per value with the
    selection metric, the main valid metrics and the seconds it took.
    """
    fit, ev = _phase(dataset, "valid")
    target = selection_metric(ev, metric)
    table: list[dict] = []
    best, best_score = None, -np.inf
    for value in grid:
        started = time.perf_counter()
        rec = make(value).fit(fit)
        res = evaluate_recommender(rec, fit, ev, seed)
        score = res.metrics.get(target, float("nan"))
        row = {"value": value, "metric": target, "score": score,
               **{m: res.metrics[m] for m in (*FULL_METRICS, *COLD_METRICS) if m in res.metrics},
               "seconds": round(time.perf_counter() - started, 3)}
        table.append(row)
        if best is None or (np.isfinite(score) and score > best_score):
            best, best_score = value, (score if np.isfinite(score) else -np.inf)
    if best is None:
        raise ValueError("tune: empty grid")
    return best, table


def fit_for_test(make: Callable[[Any], D.Recommender], value: Any, dataset: Any) -> D.Recommender:
    """``make(value)`` fitted on the test phase (train + valid), ready for ``ev`` of test."""
    fit, _ = _phase(dataset, "test")
    return make(value).fit(fit)


def metrics_table(results: Sequence[EvalResult]) -> pd.DataFrame:
    """One row per model: name + its metric means (for CSV plots)."""
    return pd.DataFrame([{"model": r.name, **r.metrics} for r in results])
