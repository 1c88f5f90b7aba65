"""The ``ease`` strategy: EASE (Steck 2019) as a registrable model that serves like the
two-tower strategies (same ``score(histories, data)`` on any catalogue, same bundle, same gate).

EASE is the strongest classical baseline on MovieLens-100k; as a strategy it can be selected on
validation and registered, so the registry can serve the best model of a run even when that
model is not a neural one. Saved as ``ease_weights.npy`` (B, [I, I] float32) + ``meta.json``
(strategy, lambda, item ids, the validation grid) in ``data/model/ease/``.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from genre_tasks.models.views import FitData

STRATEGY = "ease"
WEIGHTS_FILE = "ease_weights.npy"
META_FILE = "meta.json"


class EaseRecommender:
    """Scores = (binary history row) @ B over the items it was fitted on, mapped by item id
    onto any catalogue: items it does not know score -inf, histories it cannot read (empty or
    all unknown) get the catalogue's popularity."""

    def __init__(self, weights: np.ndarray, meta: dict) -> None:
        self.weights = np.asarray(weights, dtype=np.float32)
        self.meta = meta
        self.strategy = STRATEGY
        self.name = f"genre_{STRATEGY}"
        self.lam = float(meta["lambda"])
        self.item_ids = [str(i) for i in meta["item_ids"]]
        self._index = {iid: i for i, iid in enumerate(self.item_ids)}

    def fit(self, data: FitData) -> "EaseRecommender":
        """Refit B with the stored lambda on ``data`` (the Recommender protocol)."""
        fitted = fit_ease(data, self.lam)
        self.weights, self.item_ids, self._index = fitted.weights, fitted.item_ids, fitted._index
        self.meta = {**self.meta, "item_ids": fitted.item_ids}
        return self

    def score(self, histories: Sequence[np.ndarray], data: FitData) -> np.ndarray:
        """[len(histories), data.n_items] float32 for histories of ``data``'s item_idx."""
        from genre_tasks.models.baselines import score_blocks

        ids = np.asarray(data.item_ids).astype(str)
        n_own = len(self.item_ids)
        same = len(ids) == n_own and all(a == b for a, b in zip(ids, self.item_ids))
        if same:
            scores = score_blocks(histories, n_own, lambda h: h @ self.weights)
        else:
            own = np.asarray([self._index.get(i, -1) for i in ids], dtype=np.int64)
            mapped = [own[np.asarray(h, dtype=np.int64)] for h in histories]
            own_scores = score_blocks([h[h >= 0] for h in mapped], n_own, lambda h: h @ self.weights)
            scores = np.full((len(histories), len(ids)), -np.inf, dtype=np.float32)
            known = own >= 0
            scores[:, known] = own_scores[:, own[known]]
            histories = mapped
        empty = np.array([not np.any(np.asarray(h) >= 0) for h in histories], dtype=bool)
        if empty.any():
            scores[empty] = np.log1p(np.asarray(data.popularity, dtype=np.float64)).astype(np.float32)
        return scores


def fit_ease(fit: FitData, lam: float) -> EaseRecommender:
    """EASE on ``fit``'s binarised positives with L2 weight ``lam``."""
    from genre_tasks.models.baselines import EASE

    base = EASE(lam).fit(fit)
    return EaseRecommender(base.weights, {"strategy": STRATEGY, "lambda": float(lam),
                                          "item_ids": [str(i) for i in fit.item_ids],
                                          "fit_phase": fit.phase})


def save(rec: EaseRecommender, model_dir: str | Path) -> None:
    from genre_tasks import io

    model_dir = Path(model_dir)
    io.save_npy(rec.weights, model_dir / WEIGHTS_FILE)
    io.write_json(rec.meta, model_dir / META_FILE)


def is_saved(model_dir: str | Path) -> bool:
    return (Path(model_dir) / WEIGHTS_FILE).exists()


def load(model_dir: str | Path) -> EaseRecommender:
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / META_FILE).read_text())
    return EaseRecommender(np.load(model_dir / WEIGHTS_FILE), meta)
