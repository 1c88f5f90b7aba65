"""MovieLens-100k in RecBole's atomic-file format (what the recbole wheel ships).

``<source>/ml-100k/ml-100k.item``: tab-separated, typed header
``item_id:token  movie_title:token_seq  release_year:token  class:token_seq`` (class = genres
separated by spaces). ``<source>/ml-100k/ml-100k.inter``: ``user_id:token  item_id:token
rating:float  timestamp:float``.

items: ``item_id``, ``title``, ``text`` = ``"{title} ({year}). Genres: {g1}, {g2}."``,
``genres`` (class split on spaces), extra ``year``. interactions: ``rating`` from the file,
``label`` and ``impression_id`` null.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from genre_tasks import schema
from genre_tasks.data.adapters import (Problems, finalize_interactions, finalize_items, null_column,
                                  read_delimited, split_list, to_float, to_timestamp)

if TYPE_CHECKING:
    from genre_tasks.data.adapters.params import IngestParams

#: folder under ``Paths.source`` the ``source`` stage copies the files into
FOLDER = "ml-100k"
ITEM_FILE = "ml-100k.item"
INTER_FILE = "ml-100k.inter"


def files(p: IngestParams, source_dir: Path) -> list[tuple[Path, str]]:
    """``[(path, params key)]`` of the two files read."""
    folder = Path(source_dir) / FOLDER
    return [(folder / ITEM_FILE, "ingest.adapter"), (folder / INTER_FILE, "ingest.adapter")]


#: how the item text is built (stated in the ingest log / report)
TEXT_TEMPLATE = "{movie_title} ({release_year}). Genres: {class, comma-separated}."

ITEM_FIELDS = ("item_id", "movie_title", "release_year", "class")
INTER_FIELDS = ("user_id", "item_id", "rating", "timestamp")


def read_atomic(path: Path, expected: tuple[str, ...]) -> pd.DataFrame:
    """Read a RecBole atomic file; ``name:type`` headers become plain ``name`` (all string).

    A 0-byte file (no header at all) gives an empty frame with the ``expected`` columns.
    The index is the 1-based line of each row (see :func:`read_delimited`).
    """
    df = read_delimited(path, sep="\t", key="ingest.adapter")
    if len(df.columns) == 0:
        return pd.DataFrame({c: pd.Series(dtype="string") for c in expected}, index=df.index)
    df = df.rename(columns=lambda c: str(c).split(":", 1)[0].strip())
    if tuple(df.columns) != expected:  # a fixed format: a wrong header is a wrong file
        problems = Problems(path)
        problems.add(1, None, "\t".join(map(str, df.columns)),
                     f"the header names the RecBole fields {', '.join(expected)} (name:type)")
        problems.raise_if_any()
    return df


def item_text(title: object, year: object, genres: list[str]) -> str:
    """``"Toy Story (1995). Genres: Animation, Children's, Comedy."`` (missing parts dropped)."""
    text = title.strip() if isinstance(title, str) else ""
    if isinstance(year, str) and year.strip():
        text = f"{text} ({year.strip()})"
    text += "."
    if genres:
        text += f" Genres: {', '.join(genres)}."
    return text


def read_items(path: Path) -> pd.DataFrame:
    """``ml-100k.item`` -> canonical items (+ ``year``)."""
    raw = read_atomic(path, ITEM_FIELDS)
    n = len(raw)
    cols: dict[str, pd.Series] = {}
    if "item_id" in raw:
        cols[schema.ITEM_ID] = raw["item_id"]
    if "movie_title" in raw:  # no title column: no title, no text (validate reports both)
        years = raw["release_year"].astype(object) if "release_year" in raw else [None] * n
        genres = split_list(raw["class"], None) if "class" in raw else [[]] * n
        cols[schema.TITLE] = raw["movie_title"]
        titles = raw["movie_title"].astype(object)
        text = [item_text(t, y, g) for t, y, g in zip(titles, years, genres)]
        cols[schema.TEXT] = pd.Series(text, index=raw.index, dtype="string")
    if "class" in raw:
        cols[schema.GENRES] = split_list(raw["class"], None)
    if "release_year" in raw:
        cols["year"] = raw["release_year"]
    return finalize_items(cols, lines=raw.index)


def read_interactions(path: Path) -> pd.DataFrame:
    """``ml-100k.inter`` -> canonical interactions (rating, no label / impression).

    Refused (:class:`InputError`): a rating that is not a number, a timestamp that is not a
    number of seconds, with their file line.
    """
    raw = read_atomic(path, INTER_FIELDS)
    problems = Problems(path)
    cols = _parse_interactions(raw, problems)
    bad = problems.settle()  # refuses, or leaves the rows out (collecting_bad_rows)
    if bad:
        raw = raw[~raw.index.isin(list(bad))]
        cols = _parse_interactions(raw, Problems(path))
    n = len(raw)
    cols[schema.LABEL] = null_column(n, "Int8")
    cols[schema.IMPRESSION_ID] = null_column(n, "string")
    return finalize_interactions(cols, lines=raw.index)


def _parse_interactions(raw: pd.DataFrame, problems: Problems) -> dict[str, pd.Series]:
    cols: dict[str, pd.Series] = {}
    for name in (schema.USER_ID, schema.ITEM_ID, schema.TIMESTAMP, schema.RATING):
        if name in raw:
            cols[name] = raw[name]
    if schema.RATING in raw:
        cols[schema.RATING] = to_float(raw[schema.RATING])
        problems.unparsed(raw[schema.RATING], cols[schema.RATING], "rating:float",
                          "rating is a number")
    if schema.TIMESTAMP in raw:
        cols[schema.TIMESTAMP] = to_timestamp(raw[schema.TIMESTAMP])
        problems.unparsed(raw[schema.TIMESTAMP], cols[schema.TIMESTAMP], "timestamp:float",
                          "timestamp is a number of unix seconds")
    return cols


def read(p: IngestParams, source_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(items, interactions) from ``<source_dir>/ml-100k/``."""
    item_path, inter_path = (path for path, _ in files(p, source_dir))
    return read_items(item_path), read_interactions(inter_path)
