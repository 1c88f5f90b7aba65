"""Your own tables: an items file and an interactions file (csv, tsv or parquet by extension).

Columns are found through ``ingest.tabular.columns`` (canonical name -> your column name):

items: ``item_id``, ``title``; ``genres`` split on ``genre_separator`` (list cells of a parquet
  file are taken as they are); ``text`` = the ``text_fields`` (canonical names or your column
  names) joined with ``". "``, blank parts skipped, or your mapped ``text`` column. Every other
  column of the items file is kept as an extra string column, in file order.
interactions: ``user_id``, ``item_id``, ``timestamp`` (integer/float seconds, or date-time
  strings parsed to unix seconds, naive = UTC), ``rating``, ``label`` (0/1), ``impression_id``.
  Other columns are dropped.

A ``null`` mapping means your files lack that column: ``rating``/``label``/``impression_id``
become all-null, ``genres`` empty lists, ``text`` comes from ``text_fields``, and the required
``item_id``/``title``/``user_id``/``timestamp`` are left out. A mapped column missing from the
file leaves its canonical column out (the ``validate`` stage reports it).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from genre_tasks import schema
from genre_tasks.data.adapters import (Problems, finalize_interactions, finalize_items, join_text,
                                  log, null_column, read_table, split_list, to_float, to_label,
                                  to_timestamp)

if TYPE_CHECKING:
    from genre_tasks.data.adapters.params import IngestParams, TabularParams

ITEM_MAPPED = (schema.ITEM_ID, schema.TITLE, schema.GENRES, schema.TEXT)
INTERACTION_MAPPED = tuple(schema.INTERACTION_DTYPES)
#: canonical interaction columns that become all-null when not mapped
NULLABLE = (schema.RATING, schema.LABEL, schema.IMPRESSION_ID)


def files(p: IngestParams, source_dir: Path) -> list[tuple[Path, str]]:
    """``[(path, params key)]`` of the two files read."""
    return [(Path(source_dir) / p.tabular.items, "ingest.tabular.items"),
            (Path(source_dir) / p.tabular.interactions, "ingest.tabular.interactions")]


def mapping(tp: TabularParams, names: tuple[str, ...]) -> dict[str, str | None]:
    """Canonical name -> your column name (or None) for ``names``."""
    return {name: getattr(tp.columns, name) for name in names}


def _fill_empty(raw: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """A 0-byte file has no header: treat it as an empty table with the expected columns."""
    if len(raw.columns):
        return raw
    return pd.DataFrame({c: pd.Series(dtype="string") for c in dict.fromkeys(names)},
                        index=pd.Index([], dtype="int64", name=schema.SOURCE_LINE))


def read_items(path: Path, tp: TabularParams) -> pd.DataFrame:
    """Your items file -> canonical items (+ every unmapped column as an extra)."""
    cmap = mapping(tp, ITEM_MAPPED)
    raw = read_table(path, "ingest.tabular.items")
    raw = _fill_empty(raw, [c for c in cmap.values() if c] +
                      [f for f in tp.text_fields if f not in cmap])
    n = len(raw)

    def column(name: str) -> pd.Series | None:
        source = cmap[name]
        if source is None:
            return None
        if source not in raw.columns:
            log.warning("%s: mapped column %r (ingest.tabular.columns.%s) not found; "
                        "%r left out", path, source, name, name)
            return None
        return raw[source]

    cols: dict[str, pd.Series] = {}
    for name in (schema.ITEM_ID, schema.TITLE):
        s = column(name)
        if s is not None:
            cols[name] = s
    if cmap[schema.TEXT] is not None:
        s = column(schema.TEXT)
        if s is not None:
            cols[schema.TEXT] = s
    else:
        text = text_from_fields(raw, tp, cmap, path)
        if text is not None:
            cols[schema.TEXT] = text
    if cmap[schema.GENRES] is None:
        cols[schema.GENRES] = pd.Series([[] for _ in range(n)], index=raw.index, dtype=object)
    else:
        s = column(schema.GENRES)
        if s is not None:
            cols[schema.GENRES] = split_list(s, tp.genre_separator)
    used = {c for c in cmap.values() if c is not None}
    for c in raw.columns:
        if c in used:
            continue
        if c in schema.ITEM_COLUMNS:
            log.warning("%s: column %r is not the one mapped to it; ignored", path, c)
            continue
        cols[str(c)] = raw[c]
    return finalize_items(cols, lines=raw.index)


def text_template(p: IngestParams) -> str:
    """How the item text is built from your columns (stated in the ingest log / report)."""
    tp = p.tabular
    if tp.columns.text is not None:
        return f"your column {tp.columns.text!r} (ingest.tabular.columns.text)"
    fields = ". ".join("{" + str(f) + "}" for f in tp.text_fields)
    return f"{fields} (ingest.tabular.text_fields; blank parts skipped)"


def text_from_fields(raw: pd.DataFrame, tp: TabularParams, cmap: dict[str, str | None],
                     path: Path) -> pd.Series | None:
    """``text_fields`` joined with ". " (None, so ``text`` is left out, if one is missing)."""
    parts = []
    for field in tp.text_fields:
        source = cmap.get(field) if cmap.get(field) in raw.columns else field
        if source not in raw.columns:
            log.warning("%s: text field %r (ingest.tabular.text_fields) not found; "
                        "'text' left out", path, field)
            return None
        parts.append(raw[source])
    return join_text(*parts)


#: how each typed interaction column is parsed, and the rule a value that does not parse breaks
PARSERS = {
    schema.TIMESTAMP: (to_timestamp, "timestamp is unix seconds or an ISO date-time"),
    schema.RATING: (to_float, "rating is a number"),
    schema.LABEL: (to_label, "label is an integer (0 or 1)"),
}


def read_interactions(path: Path, tp: TabularParams) -> pd.DataFrame:
    """Your interactions file -> canonical interactions (other columns dropped).

    Refused (:class:`InputError`, naming your column and the file line / parquet row): a
    timestamp, rating or label value that does not parse (e.g. a rating ``five``); inside
    :func:`~genre_tasks.data.adapters.collecting_bad_rows` (``validate.on_bad_rows:
    quarantine``) such rows are left out and handed to validate's quarantine instead.
    """
    cmap = mapping(tp, INTERACTION_MAPPED)
    raw = read_table(path, "ingest.tabular.interactions")
    raw = _fill_empty(raw, [c for c in cmap.values() if c])
    problems = Problems(path)
    cols = _interaction_columns(raw, cmap, path, problems, warn=True)
    bad = problems.settle()
    if bad:
        raw = raw[~raw.index.isin(list(bad))]
        cols = _interaction_columns(raw, cmap, path, Problems(path), warn=False)
    return finalize_interactions(cols, lines=raw.index)


def _interaction_columns(raw: pd.DataFrame, cmap: dict[str, str | None], path: Path,
                         problems: Problems, warn: bool) -> dict[str, pd.Series]:
    cols: dict[str, pd.Series] = {}
    for name, source in cmap.items():
        if source is None:
            if name in NULLABLE:
                cols[name] = null_column(len(raw), schema.INTERACTION_DTYPES[name])
        elif source in raw.columns:
            cols[name] = raw[source]
            if name in PARSERS:
                parse, rule = PARSERS[name]
                cols[name] = parse(raw[source])
                problems.unparsed(raw[source], cols[name], source, rule)
        elif warn:
            log.warning("%s: mapped column %r (ingest.tabular.columns.%s) not found; "
                        "%r left out", path, source, name, name)
    return cols


def read(p: IngestParams, source_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(items, interactions) from your two files under ``source_dir``."""
    (items, _), (interactions, _) = files(p, source_dir)
    return read_items(items, p.tabular), read_interactions(interactions, p.tabular)
