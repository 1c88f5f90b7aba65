"""The ``fusion`` strategy: a validated blend of EASE (collaborative) and a two-tower content
model, registrable and served like the other strategies.

Score of user u for item i::

    s(u, i) = (1 - w) * z_u(ease(u, i)) + w * z_u(tower(u, i))

where ``z_u`` standardises one user's scores over the catalogue (mean 0, sd 1), so the two
models' scales do not matter, and ``w`` in [0, 1] is chosen on the validation split (``w = 0``
is EASE, ``w = 1`` the tower). EASE gives items it cannot score (no interaction in its fit data:
cold or new items) the same raw score 0 for every user, so among such items the ranking is the
tower's: fusion covers cold items through the content tower.

Parts (``score(..., part=...)``, as :meth:`genre_tasks.model.TorchRecommender.score`): ``prior``
is the tower's item-bias prior alone (one list for every user), ``personal`` the blend with
the tower's bias removed.

Saved as ``data/model/fusion/``: ``meta.json`` (strategy, weight, the validation grid) and the
two component folders ``ease/`` and ``tower/`` (each loadable on its own), so a bundle holding
the folder is self-contained.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from genre_tasks.data import FitData

STRATEGY = "fusion"
META_FILE = "meta.json"
EASE_DIR = "ease"
TOWER_DIR = "tower"


def standardise(scores: np.ndarray) -> np.ndarray:
    """Per row: (s - mean) / sd over the finite entries, float64 [n, I]; non-finite -> 0
    (neutral); a constant row -> all 0."""
    s = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(s)
    if not finite.all():
        s = np.where(finite, s, 0.0)
    mean = s.mean(axis=1, keepdims=True)
    sd = s.std(axis=1, keepdims=True)
    return np.divide(s - mean, sd, out=np.zeros_like(s), where=sd > 1e-12)


class FusionRecommender:
    """``(1 - weight) * z(ease) + weight * z(tower)`` (see the module docstring)."""

    def __init__(self, ease: Any, tower: Any, weight: float, meta: dict | None = None) -> None:
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"fusion weight {weight} not in [0, 1]")
        self.ease, self.tower, self.weight = ease, tower, float(weight)
        self.strategy = STRATEGY
        self.name = f"genre_{STRATEGY}"
        self.meta = {"strategy": STRATEGY, "weight": self.weight,
                     "tower_strategy": getattr(tower, "strategy", None),
                     "lambda": getattr(ease, "lam", None), **(meta or {})}

    def fit(self, data: FitData) -> "FusionRecommender":
        """Refit both components on ``data``; the weight stays (the Recommender protocol)."""
        self.ease.fit(data)
        self.tower.fit(data)
        return self

    def score(self, histories: Sequence[np.ndarray], data: FitData, part: str = "full") -> np.ndarray:
        """[len(histories), data.n_items] float32 (see the module docstring for ``part``)."""
        tower = standardise(self.tower.score(histories, data, part=part))
        if part == "prior":
            return tower.astype(np.float32)
        if self.weight >= 1.0:
            return tower.astype(np.float32)
        ease = standardise(self.ease.score(histories, data))
        return ((1.0 - self.weight) * ease + self.weight * tower).astype(np.float32)

    def item_representations(self, data: FitData) -> np.ndarray:
        """The tower's item representations (explanations and similarity look-ups)."""
        return self.tower.item_representations(data)


def save(rec: FusionRecommender, model_dir: str | Path) -> None:
    from genre_tasks import io, linear
    from genre_tasks import model as M

    model_dir = Path(model_dir)
    (model_dir / EASE_DIR).mkdir(parents=True, exist_ok=True)
    (model_dir / TOWER_DIR).mkdir(parents=True, exist_ok=True)
    linear.save(rec.ease, model_dir / EASE_DIR)
    M.save(rec.tower, model_dir / TOWER_DIR)
    io.write_json(rec.meta, model_dir / META_FILE)


def is_saved(model_dir: str | Path) -> bool:
    f = Path(model_dir) / META_FILE
    return f.exists() and (Path(model_dir) / EASE_DIR).is_dir() and \
        json.loads(f.read_text()).get("strategy") == STRATEGY


def load(model_dir: str | Path) -> FusionRecommender:
    from genre_tasks import linear
    from genre_tasks import model as M

    model_dir = Path(model_dir)
    meta = json.loads((model_dir / META_FILE).read_text())
    return FusionRecommender(linear.load(model_dir / EASE_DIR), M.load_recommender(model_dir / TOWER_DIR),
                             float(meta["weight"]), meta)
