"""How the models use the augmentation (each switchable, so an ablation can run each alone):

* enriched item text -> ``embed.augmented_text`` (append | replace) in the embed stage;
* user profiles and cold users' synthetic items -> the content/hybrid **user tower**: each becomes
  a *pseudo-item* (its generated text embedded with the same encoder, its topics/genres as the
  genre multi-hot, no item id) appended to the user's history, so the user tower's attention
  pooling fuses it with the history encoding. Pseudo-items are never candidates.

:class:`AugmentedUsers` wraps a fitted recommender (any model scoring any catalogue, e.g.
:class:`genre_tasks.models.model.TorchRecommender`) and adds the pseudo-items at scoring time; the
wrapped model is not retrained.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd

from genre_tasks import schema as S

PSEUDO_PREFIX = "generated:"


@dataclasses.dataclass
class PseudoItems:
    """Generated user-side items: owner user_idx [P], vectors [P, d], genre names [P][...], ids [P]."""

    users: np.ndarray
    vectors: np.ndarray
    genres: list[list[str]]
    ids: list[str]


def pseudo_items(tables: Sequence[pd.DataFrame], user_index: dict[str, int], encode) -> PseudoItems:
    """Pseudo-items from profile / synthetic-item tables (user_id, text, topics|genres).

    ``encode(texts) -> float32 [n, d]`` is the item encoder (e.g. ``embed.encode_texts``).
    Users not in ``user_index`` are skipped.
    """
    users, texts, genres, ids = [], [], [], []
    for df in tables:
        col = "topics" if "topics" in df.columns else S.GENRES
        for k, row in enumerate(df.itertuples(index=False)):
            u = user_index.get(str(getattr(row, S.USER_ID)))
            if u is None:
                continue
            users.append(u)
            texts.append(str(getattr(row, S.TEXT)))
            genres.append([str(g) for g in getattr(row, col)])
            ids.append(f"{PSEUDO_PREFIX}{col}:{getattr(row, S.USER_ID)}:{k}")
    vectors = encode(texts) if texts else np.zeros((0, 0), np.float32)
    return PseudoItems(np.asarray(users, np.int64), np.asarray(vectors, np.float32), genres, ids)


def extend_catalogue(fit, extra: PseudoItems):
    """``fit`` (a :class:`genre_tasks.models.views.FitData`) with the pseudo-items appended after its
    n_items real ones (zero popularity, no interactions)."""
    from scipy import sparse

    if len(extra.ids) == 0:
        return fit
    if extra.vectors.shape[1] != fit.item_vectors.shape[1]:
        raise ValueError(f"pseudo-item vectors have dim {extra.vectors.shape[1]}, items "
                         f"{fit.item_vectors.shape[1]}: embed them with the same encoder")
    col = {g: j for j, g in enumerate(fit.genre_names)}
    g = np.zeros((len(extra.ids), len(fit.genre_names)), np.float32)
    for i, names in enumerate(extra.genres):
        for name in names:
            if name in col:
                g[i, col[name]] = 1.0
    n = fit.n_items + len(extra.ids)
    pad = sparse.csr_matrix((fit.n_users, len(extra.ids)), dtype=np.float32)
    return dataclasses.replace(
        fit, n_items=n, item_ids=np.concatenate([np.asarray(fit.item_ids, dtype=object),
                                                 np.asarray(extra.ids, dtype=object)]),
        item_vectors=np.vstack([fit.item_vectors, extra.vectors]),
        item_genres=np.vstack([fit.item_genres, g]),
        positives=sparse.hstack([fit.positives, pad]).tocsr(),
        seen=sparse.hstack([fit.seen, pad.astype(bool)]).tocsr(),
        popularity=np.concatenate([fit.popularity, np.zeros(len(extra.ids), np.int64)]),
        timestamps=np.concatenate([fit.timestamps, np.zeros(len(extra.ids), np.int64)]))


class AugmentedUsers:
    """A fitted recommender whose users' histories get their pseudo-items (scoring time).

    ``score(histories, fit)`` must be called with ``fit.histories[u]`` arrays of the ``fit`` given
    here (as :func:`genre_tasks.evaluation.protocol.evaluate_recommender` does): a history is matched to
    its user by identity, so two users with equal histories still get their own pseudo-items.
    """

    def __init__(self, rec, fit, extra: PseudoItems, name: str | None = None) -> None:
        self.rec, self.fit, self.extra = rec, fit, extra
        self.name = name or f"{rec.name}+users"
        self.ext = extend_catalogue(fit, extra)
        self._user_of = {id(h): u for u, h in enumerate(fit.histories)}
        self._pseudo: dict[int, list[int]] = {}
        for j, u in enumerate(extra.users):
            self._pseudo.setdefault(int(u), []).append(fit.n_items + j)
        self.n_users_augmented = len(self._pseudo)

    def fit(self, data):  # the wrapped model is already fitted
        return self

    def score(self, histories: Sequence[np.ndarray], data) -> np.ndarray:
        if data is not self.fit:
            raise ValueError("AugmentedUsers scores the FitData it was built for only")
        hist = []
        for h in histories:
            u = self._user_of.get(id(h))
            extra = self._pseudo.get(u, []) if u is not None else []
            hist.append(np.concatenate([np.asarray(h, np.int64), np.asarray(extra, np.int64)]))
        return np.asarray(self.rec.score(hist, self.ext))[:, : self.fit.n_items]
