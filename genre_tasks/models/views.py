"""What models see: the processed data cut into a fit part and an evaluation part per phase.

Shared by train, evaluate, promote and the baselines so that every model is fitted and
scored on exactly the same data.

Phases (../shared/notes/evaluation-protocol.md):
``valid``  fit on the ``train`` split, evaluate on ``valid`` (all tuning happens here);
``test``   fit on ``train`` + ``valid``, evaluate on ``test`` (reported numbers).

Every recommender implements the :class:`Recommender` protocol: it scores the whole item
catalogue of a :class:`FitData` for a batch of user histories, so a model can be re-scored on
new data (e.g. a registered champion on today's test split).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from genre_tasks import schema as S

Phase = Literal["valid", "test"]
FIT_SPLITS: dict[str, tuple[str, ...]] = {"valid": ("train",), "test": ("train", "valid")}
HISTORY_COLUMN: dict[str, str] = {"valid": "hist_train", "test": "hist_trainvalid"}


@dataclass
class FitData:
    """Everything a model may use to fit for one phase. Shapes: U = n_users, I = n_items."""

    phase: Phase
    n_users: int
    n_items: int
    item_ids: np.ndarray  # [I] str, item_idx -> item_id
    user_ids: np.ndarray  # [U] str, user_idx -> user_id
    rows: pd.DataFrame  # interactions used for fitting (train, or train+valid)
    positives: "object"  # scipy.sparse.csr_matrix [U, I] float32, 1 = positive in fit rows
    seen: "object"  # scipy.sparse.csr_matrix [U, I] bool, any fit interaction (excluded at ranking)
    histories: list[np.ndarray]  # [U] positive item_idx in time order (int64)
    item_vectors: np.ndarray  # [I, d] float32, L2-normalised language-model vectors
    item_genres: np.ndarray  # [I, G] float32 multi-hot genres (classifier-filled where missing)
    genre_names: list[str]  # [G]
    popularity: np.ndarray  # [I] int64, positives per item in fit rows
    timestamps: np.ndarray  # [I] int64, last fit interaction time per item (0 = none)


@dataclass
class EvalData:
    """The evaluation part of a phase."""

    phase: Phase
    users: np.ndarray  # [N] user_idx with >= 1 positive target and a non-empty history
    targets: list[np.ndarray]  # [N] positive item_idx in the evaluated split
    impressions: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)
    """(user_idx, item_idx [m], label [m] in {0,1}) with >= 1 positive and >= 1 negative."""
    cold_items: np.ndarray | None = None  # cold_items split: the candidate items of this phase
    cold_users: np.ndarray | None = None  # users with >= 1 positive on a cold item (and history)
    cold_targets: list[np.ndarray] | None = None  # their positive cold item_idx


@runtime_checkable
class Recommender(Protocol):
    """A model that ranks the item catalogue of ``data`` for user histories."""

    name: str

    def fit(self, data: FitData) -> "Recommender":
        ...

    def score(self, histories: Sequence[np.ndarray], data: FitData) -> np.ndarray:
        """Scores [len(histories), data.n_items] float32; higher is better.

        ``histories[j]`` holds the item_idx (in ``data``'s catalogue) the user liked, in time order.
        """
        ...


def load_items(paths: S.Paths) -> pd.DataFrame:
    """Processed items, with the split-derived columns (cold, pop_*) joined from
    item_split.parquet, and genres filled by the genre classifier where they were missing."""
    items = pd.read_parquet(paths.items)
    if paths.item_split.exists():
        split = pd.read_parquet(paths.item_split)
        items = items.drop(columns=[c for c in split.columns if c != S.ITEM_IDX and c in items])
        items = items.merge(split, on=S.ITEM_IDX, how="left", validate="one_to_one")
    pred = paths.genre_predictions
    if pred.exists():
        filled = pd.read_parquet(pred, columns=[S.ITEM_ID, "genres_filled"])
        mapping = dict(zip(filled[S.ITEM_ID].astype(str), filled["genres_filled"]))
        items[S.GENRES] = [list(mapping.get(str(i), g)) for i, g in zip(items[S.ITEM_ID], items[S.GENRES])]
    return items


def load_vectors(paths: S.Paths, items: pd.DataFrame) -> np.ndarray:
    """Item vectors [I, d] aligned to items' item_idx order (checked against the index file)."""
    vectors = np.load(paths.vectors).astype(np.float32, copy=False)
    index = pd.read_parquet(paths.vector_index)
    if len(index) != len(items) or not (index[S.ITEM_ID].astype(str).to_numpy()
                                         == items[S.ITEM_ID].astype(str).to_numpy()).all():
        raise ValueError(f"{paths.vector_index}: item index does not match {paths.items}; re-run embed")
    return vectors


def genre_matrix(genres: Sequence[Sequence[str]]) -> tuple[np.ndarray, list[str]]:
    names = sorted({g for gs in genres for g in gs})
    col = {g: j for j, g in enumerate(names)}
    mat = np.zeros((len(genres), len(names)), dtype=np.float32)
    for i, gs in enumerate(genres):
        for g in gs:
            mat[i, col[g]] = 1.0
    return mat, names


def build_fit(phase: Phase, items: pd.DataFrame, inter: pd.DataFrame, hist: pd.DataFrame,
              vectors: np.ndarray) -> FitData:
    """Cut the fit part of ``phase`` out of the processed tables."""
    from scipy import sparse

    n_users = int(hist[S.USER_IDX].max()) + 1 if len(hist) else 0
    n_items = len(items)
    rows = inter[inter[S.SPLIT].isin(FIT_SPLITS[phase])]
    pos = rows[rows[S.POSITIVE]]
    positives = sparse.csr_matrix(
        (np.ones(len(pos), np.float32), (pos[S.USER_IDX].to_numpy(), pos[S.ITEM_IDX].to_numpy())),
        shape=(n_users, n_items))
    positives.data[:] = 1.0  # duplicates collapse to 1
    seen = sparse.csr_matrix(
        (np.ones(len(rows), bool), (rows[S.USER_IDX].to_numpy(), rows[S.ITEM_IDX].to_numpy())),
        shape=(n_users, n_items))
    by_user = hist.set_index(S.USER_IDX)[HISTORY_COLUMN[phase]]
    histories = [np.asarray(by_user.get(u, []), dtype=np.int64) for u in range(n_users)]
    genres, names = genre_matrix(items[S.GENRES])
    last_ts = np.zeros(n_items, np.int64)
    if len(rows):
        t = rows.groupby(S.ITEM_IDX)[S.TIMESTAMP].max()
        last_ts[t.index.to_numpy()] = t.to_numpy()
    user_ids = np.empty(n_users, dtype=object)
    user_ids[hist[S.USER_IDX].to_numpy()] = hist[S.USER_ID].astype(str).to_numpy()
    return FitData(
        phase=phase, n_users=n_users, n_items=n_items,
        item_ids=items[S.ITEM_ID].astype(str).to_numpy(), user_ids=user_ids, rows=rows,
        positives=positives, seen=seen, histories=histories, item_vectors=vectors,
        item_genres=genres, genre_names=names,
        popularity=np.bincount(pos[S.ITEM_IDX], minlength=n_items).astype(np.int64),
        timestamps=last_ts)


def build_eval(phase: Phase, items: pd.DataFrame, inter: pd.DataFrame, fit: FitData) -> EvalData:
    """Targets and impressions of ``phase`` (valid or test split rows)."""
    rows = inter[inter[S.SPLIT] == phase]
    has_history = np.array([len(h) > 0 for h in fit.histories], dtype=bool)
    pos = rows[rows[S.POSITIVE]]
    pos = pos[has_history[pos[S.USER_IDX].to_numpy()]]
    grouped = pos.groupby(S.USER_IDX, sort=True)[S.ITEM_IDX]
    users = np.asarray(list(grouped.groups.keys()), dtype=np.int64)
    targets = [np.unique(g.to_numpy()).astype(np.int64) for _, g in grouped]

    impressions: list[tuple[int, np.ndarray, np.ndarray]] = []
    imp_key = S.IMPRESSION_ID if rows[S.IMPRESSION_ID].notna().any() else S.USER_IDX
    imp_rows = rows[has_history[rows[S.USER_IDX].to_numpy()]]
    if imp_key == S.IMPRESSION_ID:
        imp_rows = imp_rows[imp_rows[S.IMPRESSION_ID].notna()]
    # one impression per key (in key order): its items in row order, an item shown twice counted
    # once with its last label; kept only if it has both a positive and a negative
    kept = imp_rows.drop_duplicates([imp_key, S.ITEM_IDX], keep="last")
    keys = kept[imp_key].to_numpy()
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    user_col = kept[S.USER_IDX].to_numpy(np.int64)[order]
    item_col = kept[S.ITEM_IDX].to_numpy(np.int64)[order]
    label_col = kept[S.POSITIVE].to_numpy().astype(np.int8)[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
    for a, b in zip(starts, np.r_[starts[1:], len(keys)].astype(np.int64)):
        labels = label_col[a:b]
        if 0 < labels.sum() < len(labels):
            impressions.append((int(user_col[a]), item_col[a:b], labels))

    ev = EvalData(phase=phase, users=users, targets=targets, impressions=impressions)
    if S.COLD in items and items[S.COLD].notna().any():
        cold = items.loc[items[S.COLD] == phase, S.ITEM_IDX].to_numpy(np.int64)
        cpos = pos[np.isin(pos[S.ITEM_IDX].to_numpy(), cold)]
        cg = cpos.groupby(S.USER_IDX, sort=True)[S.ITEM_IDX]
        ev.cold_items = cold
        ev.cold_users = np.asarray(list(cg.groups.keys()), dtype=np.int64)
        ev.cold_targets = [np.unique(g.to_numpy()).astype(np.int64) for _, g in cg]
    return ev


@dataclass
class Dataset:
    """Processed tables loaded once; ``phase(name)`` cuts (FitData, EvalData)."""

    items: pd.DataFrame
    interactions: pd.DataFrame
    histories: pd.DataFrame
    vectors: np.ndarray

    @classmethod
    def load(cls, paths: S.Paths) -> "Dataset":
        items = load_items(paths)
        return cls(items=items, interactions=pd.read_parquet(paths.interactions),
                   histories=pd.read_parquet(paths.histories), vectors=load_vectors(paths, items))

    def phase(self, phase: Phase) -> tuple[FitData, EvalData]:
        fit = build_fit(phase, self.items, self.interactions, self.histories, self.vectors)
        return fit, build_eval(phase, self.items, self.interactions, fit)


def sample_users(ev: EvalData, max_users: int | None, seed: int) -> tuple[EvalData, dict]:
    """``ev`` restricted to a seeded sample of at most ``max_users`` of its users (the union of
    ranking, impression and cold users; each keeps all its targets / impressions), and a record
    {users_total, users, sampled, seed}. Unchanged when ``max_users`` is None or not smaller."""
    imp_users = [u for u, _, _ in ev.impressions]
    everyone = np.unique(np.concatenate([np.asarray(ev.users, dtype=np.int64),
                                         np.asarray(imp_users, dtype=np.int64),
                                         np.asarray(ev.cold_users if ev.cold_users is not None else [],
                                                    dtype=np.int64)]))
    record = {"users_total": int(len(everyone)), "users": int(len(everyone)), "sampled": False,
              "seed": seed}
    if max_users is None or len(everyone) <= max_users:
        return ev, record
    keep = np.sort(np.random.default_rng(seed).choice(everyone, size=max_users, replace=False))
    inside = set(keep.tolist())
    sel = [i for i, u in enumerate(ev.users) if int(u) in inside]
    out = dataclasses.replace(
        ev, users=np.asarray(ev.users)[sel], targets=[ev.targets[i] for i in sel],
        impressions=[x for x in ev.impressions if int(x[0]) in inside])
    if ev.cold_users is not None:
        csel = [i for i, u in enumerate(ev.cold_users) if int(u) in inside]
        out = dataclasses.replace(out, cold_users=np.asarray(ev.cold_users)[csel],
                                  cold_targets=[ev.cold_targets[i] for i in csel])
    record.update(users=int(max_users), sampled=True)
    return out, record


def scoring_session(rec, data: FitData):
    """A context in which ``rec`` may reuse its per-catalogue work (e.g. a two-tower's item
    representations) across ``score`` calls on ``data``; the model must not change inside it.

    Callers that score many user batches against one catalogue (validation, evaluation) open one,
    so a big catalogue's item tower runs once, not once per batch. Recommenders without a
    ``scoring_session`` method get a no-op context."""
    session = getattr(rec, "scoring_session", None)
    return session(data) if session is not None else contextlib.nullcontext()
