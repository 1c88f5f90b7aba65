"""The ``fusion`` strategy: a validated blend of EASE (collaborative) and a two-tower content
model, registrable and served like the other strategies.

Score of user u for item i::

    s(u, i) = (1 - w) * z_u(ease(u, i)) + w * z_u(tower(u, i)) + v * z(quality(i))

where ``z_u`` standardises one user's scores over the catalogue (mean 0, sd 1), so the models'
scales do not matter; ``w`` in [0, 1] (``w = 0`` is EASE, ``w = 1`` the tower) and ``v`` >= 0
are chosen on the validation split. ``quality(i)`` is a non-personalised prior: the smoothed
log-odds that a rating of item i in the fit data is a positive (:func:`quality_prior`). The two
models are trained on positives only and rank "will interact"; among the items a user did rate
(impression AUC) whether they liked them is better told by this prior, which the selection
rule trades against nDCG (see ``genre_tasks.models.train.fusion_grid``).

EASE gives items it cannot score (no interaction in its fit data: cold or new items) the same
raw score 0 for every user, and the quality prior gives them all the global rate, so among such
items the ranking is the tower's: fusion covers cold items through the content tower.

Parts (``score(..., part=...)``, as :meth:`genre_tasks.models.model.TorchRecommender.score`): ``prior``
is the non-personalised part (the tower's item bias and the quality prior: one list for every
user), ``personal`` the rest.

Saved as ``data/model/fusion/``: ``meta.json`` (strategy, weights, the validation grid),
``quality.parquet`` (item_id, prior) and the two component folders ``ease/`` and ``tower/``
(each loadable on its own), so a bundle holding the folder is self-contained.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from genre_tasks.models.views import FitData, scoring_session

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


#: pseudo-count of the quality prior's smoothing towards the global positive rate
QUALITY_STRENGTH = 5.0
QUALITY_FILE = "quality.parquet"


def quality_prior(fit: FitData, strength: float = QUALITY_STRENGTH) -> tuple[np.ndarray, float]:
    """Per item of ``fit``: log((p + a g) / (n - p + a (1 - g))) with n = fit ratings of the item,
    p = its positives, g = the global positive rate, a = ``strength``; ([I] float64, the value of
    an item without ratings, log(g / (1 - g)))."""
    rows = fit.rows
    n_items = fit.n_items
    if len(rows) == 0:
        return np.zeros(n_items), 0.0
    from genre_tasks import schema as S

    idx = rows[S.ITEM_IDX].to_numpy(np.int64)
    n = np.bincount(idx, minlength=n_items).astype(np.float64)
    p = np.bincount(idx[rows[S.POSITIVE].to_numpy(bool)], minlength=n_items).astype(np.float64)
    g = float(np.clip(p.sum() / max(n.sum(), 1.0), 1e-3, 1 - 1e-3))
    return np.log((p + strength * g) / (n - p + strength * (1 - g))), float(np.log(g / (1 - g)))


class FusionRecommender:
    """``(1 - weight) * z(ease) + weight * z(tower) + prior_weight * z(quality)`` (see the
    module docstring). ``quality`` = (item ids, prior values, value for unknown items)."""

    def __init__(self, ease: Any, tower: Any, weight: float, meta: dict | None = None,
                 prior_weight: float = 0.0, quality: tuple[Sequence[str], np.ndarray, float] | None = None) -> None:
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"fusion weight {weight} not in [0, 1]")
        if prior_weight < 0 or (prior_weight > 0 and quality is None):
            raise ValueError("fusion prior_weight must be >= 0 (and needs the quality prior)")
        self.ease, self.tower, self.weight = ease, tower, float(weight)
        self.prior_weight = float(prior_weight)
        self.quality = quality
        self._quality_index = ({str(i): k for k, i in enumerate(quality[0])} if quality is not None else {})
        self.strategy = STRATEGY
        self.name = f"genre_{STRATEGY}"
        self.meta = {**(meta or {}), "strategy": STRATEGY, "weight": self.weight, "prior_weight": self.prior_weight,
                     "tower_strategy": getattr(tower, "strategy", None), "lambda": getattr(ease, "lam", None)}

    def quality_scores(self, data: FitData) -> np.ndarray:
        """z-scored quality prior over ``data``'s catalogue (matched by item id) [I] float64."""
        if self.quality is None:
            return np.zeros(data.n_items)
        ids, values, unknown = self.quality
        pos = np.asarray([self._quality_index.get(str(i), -1) for i in data.item_ids], np.int64)
        q = np.where(pos >= 0, np.asarray(values, np.float64)[np.maximum(pos, 0)], unknown)
        return standardise(q[None, :])[0]

    def fit(self, data: FitData) -> "FusionRecommender":
        """Refit both components on ``data``; the weight stays (the Recommender protocol)."""
        self.ease.fit(data)
        self.tower.fit(data)
        return self

    def score(self, histories: Sequence[np.ndarray], data: FitData, part: str = "full") -> np.ndarray:
        """[len(histories), data.n_items] float32 (see the module docstring for ``part``)."""
        if part not in ("full", "prior", "personal"):
            raise ValueError(f"part {part!r} not in ('full', 'prior', 'personal')")
        quality = self.prior_weight * self.quality_scores(data)[None, :] if part != "personal" else 0.0
        if part == "prior":  # the non-personalised terms: tower item bias and quality prior
            tower = standardise(self.tower.score(histories, data, part="prior"))
            return (self.weight * tower + quality).astype(np.float32)
        tower = standardise(self.tower.score(histories, data, part=part))
        ease = standardise(self.ease.score(histories, data)) if self.weight < 1.0 else 0.0
        return ((1.0 - self.weight) * ease + self.weight * tower + quality).astype(np.float32)

    def scoring_session(self, data: FitData):
        """The tower's scoring session (EASE has no per-call catalogue work)."""
        return scoring_session(self.tower, data)

    def item_representations(self, data: FitData) -> np.ndarray:
        """The tower's item representations without its bias column [I, dim] (explanations and
        similarity look-ups)."""
        return self.tower.item_representations(data)[:, :-1]


def save(rec: FusionRecommender, model_dir: str | Path) -> None:
    from genre_tasks import io
    from genre_tasks.models import linear
    from genre_tasks.models import model as M

    model_dir = Path(model_dir)
    (model_dir / EASE_DIR).mkdir(parents=True, exist_ok=True)
    (model_dir / TOWER_DIR).mkdir(parents=True, exist_ok=True)
    linear.save(rec.ease, model_dir / EASE_DIR)
    M.save(rec.tower, model_dir / TOWER_DIR)
    if rec.quality is not None:
        import pandas as pd

        ids, values, unknown = rec.quality
        io.write_parquet(pd.DataFrame({"item_id": [str(i) for i in ids],
                                       "prior": np.asarray(values, np.float64)}), model_dir / QUALITY_FILE)
        rec.meta["quality_unknown"] = float(unknown)
    io.write_json(rec.meta, model_dir / META_FILE)


def is_saved(model_dir: str | Path) -> bool:
    f = Path(model_dir) / META_FILE
    return f.exists() and (Path(model_dir) / EASE_DIR).is_dir() and \
        json.loads(f.read_text()).get("strategy") == STRATEGY


def load(model_dir: str | Path) -> FusionRecommender:
    from genre_tasks.models import linear
    from genre_tasks.models import model as M

    model_dir = Path(model_dir)
    meta = json.loads((model_dir / META_FILE).read_text())
    quality = None
    if (model_dir / QUALITY_FILE).exists():
        import pandas as pd

        q = pd.read_parquet(model_dir / QUALITY_FILE)
        quality = (q["item_id"].astype(str).tolist(), q["prior"].to_numpy(np.float64),
                   float(meta.get("quality_unknown", 0.0)))
    return FusionRecommender(linear.load(model_dir / EASE_DIR), M.load_recommender(model_dir / TOWER_DIR),
                             float(meta["weight"]), meta, float(meta.get("prior_weight", 0.0)), quality)
