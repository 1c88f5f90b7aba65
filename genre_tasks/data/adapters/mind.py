"""MIND (Microsoft News Dataset) ``news.tsv`` + ``behaviors.tsv`` (no headers, tab-separated).

news.tsv: NewsID, Category, SubCategory, Title, Abstract, URL, TitleEntities, AbstractEntities
  -> items: ``item_id`` = NewsID, ``title``, ``text`` = ``title + ". " + abstract`` (abstract
  skipped when empty), ``genres`` = ``[Category]``; extras ``category``, ``subcategory``,
  ``abstract``.
behaviors.tsv: ImpressionID, UserID, Time (``11/15/2019 8:55:22 AM``, taken as UTC), History
  (space-separated NewsIDs), Impressions (``N1-0 N2-1``)
  -> interactions, per behaviors line in file order: first the user's history clicks not seen
  on an earlier line of that user (``label`` 1, ``impression_id`` null, ``timestamp`` per
  ``ingest.mind.history_timestamp``), then one row per impression entry (``label`` 0/1,
  ``impression_id`` kept, ``timestamp`` = the line's time). ``rating`` is always null.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from genre_tasks import schema
from genre_tasks.data.adapters import (Problems, finalize_interactions, finalize_items, join_text,
                                  null_column, read_delimited, to_label, to_timestamp)

if TYPE_CHECKING:
    from genre_tasks.data.adapters.params import IngestParams

NEWS_COLUMNS = ["news_id", "category", "subcategory", "title", "abstract", "url",
                "title_entities", "abstract_entities"]
BEHAVIOR_COLUMNS = ["impression_id", "user_id", "time", "history", "impressions"]
#: MIND's own column names, used in messages (the files have no header)
MIND_NAMES = {"news_id": "NewsID", "category": "Category", "subcategory": "SubCategory",
              "title": "Title", "abstract": "Abstract", "url": "URL",
              "title_entities": "TitleEntities", "abstract_entities": "AbstractEntities",
              "impression_id": "ImpressionID", "user_id": "UserID", "time": "Time",
              "history": "History", "impressions": "Impressions"}
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"
#: how the item text is built (stated in the ingest log / report)
TEXT_TEMPLATE = "{Title}. {Abstract} (news.tsv; the abstract skipped when empty)"


def files(p: IngestParams, source_dir: Path) -> list[tuple[Path, str]]:
    """``[(path, params key)]`` of the two files read."""
    return [(Path(source_dir) / p.mind.news, "ingest.mind.news"),
            (Path(source_dir) / p.mind.behaviors, "ingest.mind.behaviors")]


def read_news(path: Path) -> pd.DataFrame:
    """news.tsv -> canonical items (+ category, subcategory, abstract)."""
    raw = read_delimited(path, sep="\t", names=[MIND_NAMES[c] for c in NEWS_COLUMNS],
                         key="ingest.mind.news")
    raw.columns = NEWS_COLUMNS
    genres = pd.Series([[c.strip()] if isinstance(c, str) and c.strip() else []
                        for c in raw["category"].astype(object)], index=raw.index, dtype=object)
    return finalize_items({
        schema.ITEM_ID: raw["news_id"],
        schema.TITLE: raw["title"],
        schema.TEXT: join_text(raw["title"], raw["abstract"]),
        schema.GENRES: genres,
        "category": raw["category"],
        "subcategory": raw["subcategory"],
        "abstract": raw["abstract"],
    }, lines=raw.index)


def parse_time(s: pd.Series) -> pd.Series:
    """MIND ``Time`` -> Int64 unix seconds (UTC); other date-time spellings are tried too."""
    dt = pd.to_datetime(s.astype(object), format=TIME_FORMAT, errors="coerce", utc=True)
    secs = pd.Series(pd.array([pd.NA] * len(s), dtype="Int64"), index=s.index)
    ok = dt.notna()
    secs[ok] = ((dt[ok] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).astype("int64")
    rest = ~ok & s.notna()
    if rest.any():
        secs[rest] = to_timestamp(s[rest])
    return secs


def explode_entries(values: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split each cell on whitespace: ``(line, pos, entry)`` arrays, one element per entry
    (``line`` = row of ``values``, ``pos`` = position in the cell; null cells give nothing)."""
    lists = [v.split() if isinstance(v, str) else [] for v in values.astype(object)]
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    total = int(lengths.sum())
    line = np.repeat(np.arange(len(lists), dtype=np.int64), lengths)
    pos = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    entry = np.fromiter(itertools.chain.from_iterable(lists), dtype=object, count=total)
    return line, pos, entry


def impression_labels(labels: list[str | None]) -> pd.Series:
    """``"0"``/``"1"`` (fast path) or any integer text -> Int8; anything else -> null."""
    raw = pd.Series(labels, dtype=object)
    fast = raw.map({"0": 0, "1": 1})
    rest = fast.isna() & raw.notna()
    out = pd.Series(pd.array(fast, dtype="Int8"))
    if rest.any():
        out[rest] = to_label(raw[rest].astype("string"))
    return out


def _check_behaviors(raw: pd.DataFrame, problems: Problems) -> Problems:
    """The row-level value problems of behaviors.tsv: a Time that does not parse, an empty
    Impressions field, an impression entry that is not ``<NewsID>-<0|1>``."""
    parsed_time = parse_time(raw["time"])
    problems.unparsed(raw["time"], parsed_time, "Time",
                      "Time is a date-time like 11/15/2019 8:55:22 AM")
    for line in raw.index[raw["impressions"].isna().to_numpy()]:
        problems.add(line, "Impressions", None, "Impressions holds at least one <NewsID>-<0|1> "
                                                "entry (it is empty)")
    i_line, _, entries = explode_entries(raw["impressions"])
    parts = [e.rpartition("-") for e in entries]
    i_label = impression_labels([tail if sep else None for _, sep, tail in parts])
    bad = np.array([not (sep and head) for head, sep, _ in parts], dtype=bool) | \
        ~i_label.isin([0, 1]).fillna(False).to_numpy(dtype=bool)
    lines = raw.index.to_numpy()
    cap = None if problems.collect_all else 1000
    for k in np.flatnonzero(bad)[:cap]:
        problems.add(lines[i_line[k]], "Impressions", entries[k],
                     "an impression entry is <NewsID>-<label> with label 0 or 1")
    if cap is not None:
        problems.total += max(0, int(bad.sum()) - 1000)
    return problems


def read_behaviors(path: Path, history_timestamp: str) -> pd.DataFrame:
    """behaviors.tsv -> canonical interactions (see module docstring for the row order).

    Refused (:class:`InputError`, with the file line): a line without exactly 5 fields, a Time
    that does not parse, an empty Impressions field, an impression entry that is not
    ``<NewsID>-<0|1>``.
    """
    raw = read_delimited(path, sep="\t", names=[MIND_NAMES[c] for c in BEHAVIOR_COLUMNS],
                         key="ingest.mind.behaviors")
    raw.columns = BEHAVIOR_COLUMNS
    bad = _check_behaviors(raw, Problems(path)).settle()
    if bad:  # inside collecting_bad_rows: the lines with a bad value are left out
        raw = raw[~raw.index.isin(list(bad))]
    parsed_time = parse_time(raw["time"])
    times = parsed_time.to_numpy(dtype="float64", na_value=np.nan)
    users = raw["user_id"].to_numpy(dtype=object, na_value=None)
    impression_ids = raw["impression_id"].to_numpy(dtype=object, na_value=None)
    i_line, i_pos, entries = explode_entries(raw["impressions"])
    parts = [e.rpartition("-") for e in entries]
    i_item = np.array([head if sep else tail for head, sep, tail in parts], dtype=object)
    i_label = impression_labels([tail if sep else None for _, sep, tail in parts])
    lines = raw.index.to_numpy()
    # history: the same user's history repeats on each of their lines: keep first occurrences
    h_line, h_pos, h_item = explode_entries(raw["history"])
    first_seen = ~pd.DataFrame({"u": users[h_line], "i": h_item}).duplicated().to_numpy()
    h_line, h_pos, h_item = h_line[first_seen], h_pos[first_seen], h_item[first_seen]
    if history_timestamp == "global_first_impression":
        h_time = np.full(len(h_line), np.nanmin(times) - 1 if np.isfinite(times).any() else np.nan)
    else:  # first_impression: the user's earliest impression time - 1 s
        first = pd.Series(times).groupby(pd.Series(users, dtype=object), dropna=False).min() - 1
        h_time = pd.Series(users[h_line], dtype=object).map(first).to_numpy(dtype="float64")

    # per behaviors line: history rows first, then the impression entries
    line = np.concatenate([h_line, i_line])
    kind = np.concatenate([np.zeros(len(h_line), np.int8), np.ones(len(i_line), np.int8)])
    order = np.lexsort((np.concatenate([h_pos, i_pos]), kind, line))
    n = len(order)
    label = pd.concat([pd.Series(pd.array(np.ones(len(h_line), np.int8), dtype="Int8")),
                       i_label], ignore_index=True)
    impression = np.concatenate([np.full(len(h_line), None, dtype=object), impression_ids[i_line]])
    return finalize_interactions({
        schema.USER_ID: pd.Series(users[line[order]], dtype="string"),
        schema.ITEM_ID: pd.Series(np.concatenate([h_item, i_item])[order], dtype="string"),
        schema.TIMESTAMP: pd.Series(np.concatenate([h_time, times[i_line]])[order]
                                    ).astype("Int64"),
        schema.RATING: null_column(n, "float64"),
        schema.LABEL: label.iloc[order].reset_index(drop=True),
        schema.IMPRESSION_ID: pd.Series(impression[order], dtype="string"),
    }, lines=lines[line[order]])


def read(p: IngestParams, source_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(items, interactions) from ``news.tsv`` / ``behaviors.tsv`` under ``source_dir``."""
    (news, _), (behaviors, _) = files(p, source_dir)
    return read_news(news), read_behaviors(behaviors, p.mind.history_timestamp)
