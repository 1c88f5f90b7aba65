"""preprocess stage: clean text, derive implicit labels, index ids, split, build histories.

Reads the validated raw tables (data/raw/*.parquet; refuses to run unless the validate stage
left a successful data/validation/summary.json) and writes data/processed/:

``items.parquet``
    item_id, item_idx (int32, 0..n_items-1 = row of the embedding matrix), title, text
    (cleaned; or built from the item's columns by ``preprocess.text_template``), genres
    (list[str]), extra columns: only what comes from the items, so it stays byte-identical
    when only interactions change (a feedback batch) and the item stages (augment, embed,
    genre) are skipped by DVC.
``item_split.parquet``
    item_idx, cold ("test" | "valid" | null; cold_items split only), pop_train /
    pop_trainvalid (int: positives in train / train+valid): the item columns that follow from
    the split (``genre_tasks.models.views.load_items`` joins them back).
``interactions.parquet``
    the canonical columns + row (original order), user_idx, item_idx, positive (bool),
    split ("train" | "valid" | "test"), sorted by (user_idx, timestamp, row).
``histories.parquet``
    user_idx, user_id, hist_train, hist_trainvalid: each user's positive item_idx in time
    order (what the user tower reads when fitting on train / on train+valid).
``split.json``
    the split mode and its sizes (rows, positives, users per split; cold item counts).

Splits follow ../shared/notes/evaluation-protocol.md:
``user_temporal``  per user, sorted by (timestamp, row): last ceil(10%) test, previous
                   ceil(10%) valid (each at least 1), the rest train.
``cold_items``     seeded 10% of items with >= 1 positive are cold test items, all their
                   interactions go to test; another seeded 10% of the warm ones are cold
                   valid items (their interactions go to valid); the warm rest is split per
                   user as above.
``global_temporal``all rows sorted by (timestamp, row): first 80% train, next 10% valid,
                   last 10% test.
"""
from __future__ import annotations

import math
import re
import string
import unicodedata
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from genre_tasks import config, io, logs
from genre_tasks import schema as S
from genre_tasks.errors import StageError


@dataclass(frozen=True)
class SplitParams:
    mode: Literal["user_temporal", "cold_items", "global_temporal"] = "user_temporal"
    valid_frac: float = 0.1
    test_frac: float = 0.1
    cold_frac: float = 0.1
    seed: int = 42
    valid_seed: int = 43

    def validate(self) -> None:
        for name in ("valid_frac", "test_frac", "cold_frac"):
            value = getattr(self, name)
            if not 0.0 < value < 0.5:
                raise config.ParamsError(f"preprocess.split.{name}: {value} not in (0, 0.5)")


@dataclass(frozen=True)
class PreprocessParams:
    """``preprocess`` section. ``text_template``: null = the adapter's item text (e.g. MovieLens'
    "Title (year). Genres: a, b."); else the text the encoder reads, built per item from its
    columns with Python format fields, e.g. ``"{title}. Genres: {genres}. Released {year}."``
    (lists are joined with ", ", missing values are empty; empty brackets and the spaces they
    leave are removed). Fields must be item columns; ``{text}`` is the adapter's text."""
    positive_threshold: float = 4.0
    text_max_chars: int = 2000
    k_core: int = 0
    split: SplitParams = field(default_factory=SplitParams)
    text_template: str | None = None

    def validate(self) -> None:
        if self.text_template is not None:
            template_fields(self.text_template)


def template_fields(template: str) -> list[str]:
    """The field names of ``text_template`` (refused: bad braces, no field, attribute/index access,
    conversions or format specs)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise config.ParamsError(f"preprocess.text_template: {exc} in {template!r}") from None
    names = []
    for _, name, spec, conv in parts:
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise config.ParamsError(f"preprocess.text_template: {{{name}}} in {template!r}: use plain "
                                     f"column names like {{title}} (no attributes, indexes or formats)")
        names.append(name)
    if not names:
        raise config.ParamsError(f"preprocess.text_template: {template!r} names no item column")
    return names


def _field_text(value: object) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(str(v) for v in value if v is not None and not (isinstance(v, float) and math.isnan(v)))
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


_EMPTY_BRACKETS = re.compile(r"\(\s*\)|\[\s*\]")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")


def render_text(items: pd.DataFrame, template: str) -> list[str]:
    """``template`` filled per item from its columns (see :class:`PreprocessParams`)."""
    names = template_fields(template)
    missing = sorted({n for n in names if n not in items.columns})
    if missing:
        raise config.ParamsError(f"preprocess.text_template: no item column {missing} "
                                 f"(the items have {sorted(items.columns)})")
    out = []
    for row in items[list(dict.fromkeys(names))].itertuples(index=False):
        values = {n: _field_text(getattr(row, n)) for n in dict.fromkeys(names)}
        text = _EMPTY_BRACKETS.sub("", template.format_map(values))
        out.append(_SPACE_BEFORE_PUNCT.sub(r"\1", _SPACE.sub(" ", text)).strip())
    return out


_TAGS = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def clean_text(text: str | None, max_chars: int) -> str:
    """NFKC-normalise, drop HTML tags and control characters, collapse whitespace, cut."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    text = unicodedata.normalize("NFKC", str(text))
    text = _TAGS.sub(" ", text)
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in text)
    text = _SPACE.sub(" ", text).strip()
    return text[:max_chars].rstrip()


def positive_labels(inter: pd.DataFrame, threshold: float) -> pd.Series:
    """Implicit positives: label == 1 where a label exists, else rating >= threshold."""
    label = inter[S.LABEL] if S.LABEL in inter else pd.Series(pd.NA, index=inter.index, dtype="Int8")
    rating = inter[S.RATING] if S.RATING in inter else pd.Series(np.nan, index=inter.index)
    from_rating = rating.fillna(-np.inf) >= threshold
    return label.astype("Int8").eq(1).fillna(False).where(label.notna(), from_rating).astype(bool)


def k_core(inter: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iteratively keep users and items with at least ``k`` interactions (k <= 1: no-op)."""
    if k <= 1:
        return inter
    while True:
        u = inter.groupby(S.USER_ID)[S.ITEM_ID].transform("size")
        i = inter.groupby(S.ITEM_ID)[S.USER_ID].transform("size")
        keep = (u >= k) & (i >= k)
        if keep.all():
            return inter
        inter = inter[keep]


def _tail_counts(n: pd.Series, frac: float) -> pd.Series:
    # ceil(n * frac) with at least 1; the epsilon keeps 30 * 0.1 at 3, not 4
    return np.maximum(1, np.ceil(n * frac - 1e-9)).astype(int)


def user_temporal_split(inter: pd.DataFrame, valid_frac: float, test_frac: float) -> pd.Series:
    """Per-user split labels for rows sorted by (user_idx, timestamp, row)."""
    grp = inter.groupby(S.USER_IDX, sort=False)
    n = grp[S.ROW].transform("size")
    rev = n - 1 - grp.cumcount()
    n_test = _tail_counts(n, test_frac)
    n_valid = _tail_counts(n, valid_frac)
    split = np.where(rev < n_test, "test", np.where(rev < n_test + n_valid, "valid", "train"))
    return pd.Series(split, index=inter.index)


def global_temporal_split(inter: pd.DataFrame, valid_frac: float, test_frac: float) -> pd.Series:
    """First (1 - valid - test) of all rows by (timestamp, row) train, then valid, then test."""
    order = inter.sort_values([S.TIMESTAMP, S.ROW], kind="stable").index
    n = len(order)
    n_train = int(round(n * (1 - valid_frac - test_frac)))
    n_valid = int(round(n * valid_frac))
    labels = np.array(["train"] * n_train + ["valid"] * n_valid + ["test"] * (n - n_train - n_valid))
    return pd.Series(labels, index=order).reindex(inter.index)


def choose_cold_items(candidates: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Seeded choice of ``ceil(frac * len(candidates))`` item ids (sorted input -> stable)."""
    candidates = np.sort(np.asarray(candidates))
    n = max(1, int(math.ceil(len(candidates) * frac - 1e-9)))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=min(n, len(candidates)), replace=False))


def _id_order(ids: pd.Series) -> list:
    """Unique ids in natural order: numeric when all ids are digits, else lexicographic."""
    uniq = pd.unique(ids.astype(str))
    if all(u.isdigit() for u in uniq):
        return sorted(uniq, key=int)
    return sorted(uniq)


def split_interactions(inter: pd.DataFrame, items: pd.DataFrame, p: SplitParams) -> tuple[pd.Series, pd.Series]:
    """Return (split label per interaction row, cold label per item row)."""
    cold = pd.Series(pd.NA, index=items.index, dtype="string")
    if p.mode == "global_temporal":
        return global_temporal_split(inter, p.valid_frac, p.test_frac), cold
    if p.mode == "user_temporal":
        return user_temporal_split(inter, p.valid_frac, p.test_frac), cold
    # cold_items
    with_pos = np.unique(inter.loc[inter[S.POSITIVE], S.ITEM_IDX].to_numpy())
    cold_test = choose_cold_items(with_pos, p.cold_frac, p.seed)
    warm = np.setdiff1d(with_pos, cold_test)
    cold_valid = choose_cold_items(warm, p.cold_frac, p.valid_seed)
    cold.loc[items[S.ITEM_IDX].isin(cold_test).to_numpy()] = "test"
    cold.loc[items[S.ITEM_IDX].isin(cold_valid).to_numpy()] = "valid"
    split = pd.Series("train", index=inter.index, dtype=object)
    in_test = inter[S.ITEM_IDX].isin(cold_test)
    in_valid = inter[S.ITEM_IDX].isin(cold_valid)
    split[in_test] = "test"
    split[in_valid] = "valid"
    warm_rows = ~(in_test | in_valid)
    split[warm_rows] = user_temporal_split(inter[warm_rows], p.valid_frac, p.test_frac)
    return split, cold


def histories(inter: pd.DataFrame, splits: tuple[str, ...]) -> pd.Series:
    """Positive item_idx per user_idx in time order, from rows whose split is in ``splits``."""
    rows = inter[inter[S.SPLIT].isin(splits) & inter[S.POSITIVE]]
    return rows.groupby(S.USER_IDX, sort=True)[S.ITEM_IDX].agg(lambda s: s.to_numpy(np.int32).tolist())


def _split_stats(inter: pd.DataFrame, items: pd.DataFrame, p: SplitParams) -> dict:
    stats: dict = {"mode": p.mode, "n_users": int(inter[S.USER_IDX].nunique()),
                   "n_items": int(len(items)), "n_interactions": int(len(inter)),
                   "n_positives": int(inter[S.POSITIVE].sum())}
    for name in S.SPLITS:
        part = inter[inter[S.SPLIT] == name]
        stats[name] = {"rows": int(len(part)), "positives": int(part[S.POSITIVE].sum()),
                       "users": int(part[S.USER_IDX].nunique()),
                       "users_with_positive": int(part.loc[part[S.POSITIVE], S.USER_IDX].nunique())}
    if p.mode == "cold_items":
        stats["cold_test_items"] = int((items[S.COLD] == "test").sum())
        stats["cold_valid_items"] = int((items[S.COLD] == "valid").sum())
    return stats


def preprocess(items: pd.DataFrame, inter: pd.DataFrame, p: PreprocessParams) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """Pure transformation raw tables -> (items, interactions, histories, split stats)."""
    items = items.reset_index(drop=True).copy()
    inter = inter.reset_index(drop=True).copy()
    inter[S.ROW] = np.arange(len(inter), dtype=np.int64)
    items[S.TEXT] = [clean_text(t, p.text_max_chars) for t in items[S.TEXT]]
    items[S.TITLE] = [clean_text(t, p.text_max_chars) for t in items[S.TITLE]]
    if p.text_template is not None:  # from the cleaned title / text and the other columns
        items[S.TEXT] = [clean_text(t, p.text_max_chars) for t in render_text(items, p.text_template)]
    items[S.GENRES] = [list(g) if g is not None else [] for g in items[S.GENRES]]
    items[S.ITEM_IDX] = np.arange(len(items), dtype=np.int32)

    inter = k_core(inter, p.k_core)
    item_idx = pd.Series(items[S.ITEM_IDX].to_numpy(), index=items[S.ITEM_ID].astype(str))
    inter[S.ITEM_IDX] = item_idx.reindex(inter[S.ITEM_ID].astype(str)).to_numpy().astype(np.int32)
    users = _id_order(inter[S.USER_ID])
    user_idx = pd.Series(np.arange(len(users), dtype=np.int32), index=users)
    inter[S.USER_IDX] = user_idx.reindex(inter[S.USER_ID].astype(str)).to_numpy().astype(np.int32)
    inter[S.POSITIVE] = positive_labels(inter, p.positive_threshold)
    inter = inter.sort_values([S.USER_IDX, S.TIMESTAMP, S.ROW], kind="stable").reset_index(drop=True)

    split, cold = split_interactions(inter, items, p.split)
    inter[S.SPLIT] = split.to_numpy()
    items[S.COLD] = cold.to_numpy()
    for name, splits in (("pop_train", ("train",)), ("pop_trainvalid", ("train", "valid"))):
        pos = inter[inter[S.SPLIT].isin(splits) & inter[S.POSITIVE]]
        items[name] = np.bincount(pos[S.ITEM_IDX], minlength=len(items)).astype(np.int64)

    hist = pd.DataFrame({S.USER_IDX: user_idx.to_numpy(), S.USER_ID: user_idx.index.astype(str)})
    for col, splits in (("hist_train", ("train",)), ("hist_trainvalid", ("train", "valid"))):
        h = histories(inter, splits)
        hist[col] = [h.get(u, []) for u in hist[S.USER_IDX]]
    return items, inter, hist, _split_stats(inter, items, p.split)


def run(p: PreprocessParams, paths: S.Paths) -> dict:
    with logs.stage("preprocess", paths) as log:
        summary_path = paths.validation_summary
        summary = io.read_json(summary_path) if summary_path.exists() else {}
        if not summary.get("success", False):
            raise StageError(f"{summary_path}: no successful validation; run the validate stage first")
        log.read(summary_path, "validation passed")
        from genre_tasks.data.quarantine import drop_quarantined
        from genre_tasks.data.validate import require_current

        require_current(summary, paths)  # raw tables changed after validation: refuse
        items = pd.read_parquet(paths.raw_items)
        log.read(paths.raw_items, f"{len(items):,} items")
        inter = pd.read_parquet(paths.raw_interactions)
        log.read(paths.raw_interactions, f"{len(inter):,} interactions")
        items, inter = drop_quarantined(summary, items, inter)  # validate.on_bad_rows: quarantine

        items, inter, hist, stats = preprocess(items, inter, p)
        for name in S.SPLITS:
            s = stats[name]
            log.logger.info("split %-15s %-5s rows=%7d positives=%6d users=%4d", p.split.mode, name,
                            s["rows"], s["positives"], s["users"])
        split_cols = [c for c in S.ITEM_SPLIT_COLUMNS if c in items]
        io.write_parquet(items.drop(columns=split_cols), paths.items)
        log.wrote(paths.items, f"{len(items):,} items")
        io.write_parquet(items[[S.ITEM_IDX, *split_cols]], paths.item_split)
        log.wrote(paths.item_split, f"{', '.join(split_cols)} per item")
        io.write_parquet(inter, paths.interactions)
        log.wrote(paths.interactions, f"{len(inter):,} interactions")
        io.write_parquet(hist, paths.histories)
        log.wrote(paths.histories, f"{len(hist):,} users")
        io.write_json(stats, paths.split_info)
        io.write_json(stats, paths.metrics("preprocess"))
        log.wrote(paths.split_info)
        return {**stats, "seconds": round(log.seconds, 2)}


def main(params: dict, paths: S.Paths) -> dict:
    return run(config.section(PreprocessParams, "preprocess", params), paths)
