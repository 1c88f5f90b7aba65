"""The Great Expectations suites of the validate stage, planned from a table (no GX context).

Three GX 1.x suites; each :class:`SuitePlan` holds the frame to check and its expectations:

``items``         row count, required columns, dtypes, non-null unique ``item_id``, non-blank
                  ``title``/``text``, text length bounds, no U+FFFD, ``genres`` is a list
``item_genres``   ``genres`` exploded (one row per item genre, indexed by the item's row):
                  every genre is a string and, if ``genre_vocabulary`` is set, in it
``interactions``  row count, required columns, dtypes, non-null ids and timestamps, rating
                  bounds, label in {0, 1}, a rating or a label per row, timestamp bounds,
                  unique events, and every ``item_id`` present in items

The feedback loop checks a new interaction batch with the same ``interactions`` suite.
Running the plans and reporting their results: :mod:`genre_tasks.data.gx_report`.
``great_expectations`` is imported inside functions: importing it takes ~3 s.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from genre_tasks.data.validate_params import ValidateParams
from genre_tasks.schema import (
    GENRES,
    IMPRESSION_ID,
    INTERACTION_DTYPES,
    ITEM_COLUMNS,
    ITEM_ID,
    LABEL,
    RATING,
    TEXT,
    TIMESTAMP,
    TITLE,
    USER_ID,
)

#: pandas dtype each items column must have (``genres`` holds lists: object dtype).
ITEM_DTYPES = {ITEM_ID: "string", TITLE: "string", TEXT: "string", GENRES: "object"}
#: Nullable dtype accepted instead of the canonical one (ingest leaves a timestamp column
#: holding unparseable values as Int64; the not-null rule then reports those rows).
NULLABLE_DTYPES = {TIMESTAMP: "Int64"}
#: The columns (in this order) that identify an interaction event.
EVENT_KEY = (USER_ID, ITEM_ID, TIMESTAMP, IMPRESSION_ID)
#: Derived boolean column of the interactions batch: does the row's item_id exist in items?
ITEM_EXISTS = "item_id_in_items"
#: Column of the derived ``item_genres`` batch (one row per genre of an item).
GENRE = "genre"
REPLACEMENT_CHAR = "\ufffd"

SUITE_ITEMS = "items"
SUITE_ITEM_GENRES = "item_genres"
SUITE_INTERACTIONS = "interactions"


@dataclass(frozen=True)
class Check:
    """One planned expectation: its key (in the expectation's meta), rule and columns."""

    key: str
    rule: str
    columns: tuple[str, ...]
    expectation: Any


@dataclass
class SuitePlan:
    """A GX suite to run on ``frame`` for report table ``table``.

    ``frame``'s index is the row number in the raw table (for ``item_genres``, the item's row;
    several genres of one item share it), so GX's unexpected index lists are raw row numbers.
    """

    name: str
    table: str
    frame: pd.DataFrame
    checks: list[Check] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    #: columns of the table shown next to a sample row (identify the row)
    context_columns: tuple[str, ...] = ()
    #: what one row of ``frame`` is, in messages
    unit: str = "rows"

    def add(self, rule: str, kind: str, *, columns: Iterable[str] = (),
            requires: Iterable[str] | None = None, **kwargs: Any) -> None:
        """Add ``gx.expectations.<kind>(**kwargs)``, or record it as skipped when a column
        it ``requires`` (default: ``columns``) is missing from the table."""
        import great_expectations as gx

        columns = tuple(columns)
        needed = tuple(columns if requires is None else requires)
        missing = [c for c in needed if c not in self.frame.columns]
        if missing:
            self.skip(rule, columns, f"column {', '.join(missing)} is missing")
            return
        key = f"{self.name}:{len(self.checks)}"
        expectation = getattr(gx.expectations, kind)(**kwargs, meta={"rule": rule, "check": key})
        self.checks.append(Check(key, rule, columns, expectation))

    def skip(self, rule: str, columns: Iterable[str], reason: str) -> None:
        self.skipped.append({"suite": self.name, "rule": rule, "column": ", ".join(columns) or None,
                             "reason": reason})


def normalize(df: pd.DataFrame, string_columns: Iterable[str]) -> pd.DataFrame:
    """Row-numbered copy of a raw table with lossless representation fixes only.

    pandas' ``str`` and ``string`` dtypes both hold strings (parquet round trips give either),
    so ``str`` becomes ``string``; list cells read from parquet (numpy arrays) become lists.
    Anything else (object columns of mixed values, numbers, ...) is left for the suites.
    """
    out = df.reset_index(drop=True)
    for col in string_columns:
        if col in out.columns and str(out[col].dtype) == "str":
            out[col] = out[col].astype("string")
    if GENRES in out.columns and out[GENRES].dtype == object:
        out[GENRES] = out[GENRES].map(lambda v: v.tolist() if hasattr(v, "tolist") else v)
    return out


def plan_items(items: pd.DataFrame, p: ValidateParams) -> list[SuitePlan]:
    """Suites ``items`` and ``item_genres`` for a normalized items table."""
    plan = SuitePlan(SUITE_ITEMS, "items", items, context_columns=(ITEM_ID, TITLE))
    plan.add("table has at least 1 row", "ExpectTableRowCountToBeBetween", min_value=1)
    for col in ITEM_COLUMNS:
        plan.add("column exists", "ExpectColumnToExist", columns=[col], requires=(), column=col)
    for col, dtype in ITEM_DTYPES.items():
        plan.add(f"column type is {dtype}", "ExpectColumnTypeToBe", columns=[col], column=col,
                 type_=dtype)
    for col in (ITEM_ID, TITLE, TEXT, GENRES):
        plan.add("value is not null", "ExpectColumnValuesToNotBeNull", columns=[col], column=col)
    plan.add("item ids are unique", "ExpectColumnValuesToBeUnique", columns=[ITEM_ID],
             column=ITEM_ID)
    for col in (TITLE, TEXT):
        plan.add(f"{col} is not empty or blank", "ExpectColumnValuesToMatchRegex", columns=[col],
                 column=col, regex=r"\S")
    plan.add(f"text length is between {p.text_min_chars} and {p.text_max_chars} characters",
             "ExpectColumnValueLengthsToBeBetween", columns=[TEXT], column=TEXT,
             min_value=p.text_min_chars, max_value=p.text_max_chars)
    for col in (TITLE, TEXT):
        plan.add(f"{col} is valid UTF-8 (no U+FFFD replacement character)",
                 "ExpectColumnValuesToNotMatchRegex", columns=[col], column=col,
                 regex=REPLACEMENT_CHAR)
    plan.add("genres is a list", "ExpectColumnValuesToBeInTypeList", columns=[GENRES],
             column=GENRES, type_list=["list"])

    genres = SuitePlan(SUITE_ITEM_GENRES, "items", _explode_genres(items),
                       context_columns=(ITEM_ID, GENRES), unit="item genres")
    vocab_rule = (f"genre is in the vocabulary ({len(p.genre_vocabulary)} genres)"
                  if p.genre_vocabulary is not None else None)
    if GENRES not in items.columns:
        plan.skip("genre is a string", [GENRES], f"column {GENRES} is missing")
        if vocab_rule:
            plan.skip(vocab_rule, [GENRES], f"column {GENRES} is missing")
        return [plan]
    # reported against the items column ``genres``; GX checks the exploded ``genre`` column
    genres.add("genre is a string", "ExpectColumnValuesToBeInTypeList", columns=[GENRES],
               requires=[GENRE], column=GENRE, type_list=["str"])
    genres.add("genre is valid UTF-8 (no U+FFFD replacement character)",
               "ExpectColumnValuesToNotMatchRegex", columns=[GENRES], requires=[GENRE],
               column=GENRE, regex=REPLACEMENT_CHAR)
    if vocab_rule:
        genres.add(vocab_rule, "ExpectColumnValuesToBeInSet", columns=[GENRES], requires=[GENRE],
                   column=GENRE, value_set=list(p.genre_vocabulary))
    return [plan, genres]


def _explode_genres(items: pd.DataFrame) -> pd.DataFrame:
    """One row per (item, genre); the index is the item's row in the items table."""
    if GENRES not in items.columns:
        return pd.DataFrame({GENRE: pd.Series([], dtype=object)})
    lists = items[GENRES].dropna()
    exploded = lists.explode().dropna() if len(lists) else lists
    return pd.DataFrame({GENRE: exploded.astype(object)})


def plan_interactions(interactions: pd.DataFrame, item_ids: pd.Series | None,
                      p: ValidateParams) -> list[SuitePlan]:
    """Suite ``interactions`` for a normalized interactions table.

    ``item_ids`` are the ids of the items table (None: it has no item_id column, so the
    referential-integrity rule is skipped).
    """
    frame = interactions
    if item_ids is not None and ITEM_ID in interactions.columns:
        # pd.NA where item_id is null: map expectations ignore it (the not-null rule reports it)
        exists = interactions[ITEM_ID].isin(item_ids.dropna()).astype("boolean")
        exists[interactions[ITEM_ID].isna()] = pd.NA
        frame = interactions.assign(**{ITEM_EXISTS: exists})
    plan = SuitePlan(SUITE_INTERACTIONS, "interactions", frame,
                     context_columns=(USER_ID, ITEM_ID, TIMESTAMP))
    plan.add("table has at least 1 row", "ExpectTableRowCountToBeBetween", min_value=1)
    for col in (USER_ID, ITEM_ID, TIMESTAMP):
        plan.add("column exists", "ExpectColumnToExist", columns=[col], requires=(), column=col)
    feedback = [c for c in (RATING, LABEL) if c in frame.columns]
    if not feedback:  # one failing rule for the pair
        plan.add("column exists (at least one of rating / label)", "ExpectColumnToExist",
                 columns=[RATING], requires=(), column=RATING)
    for col in feedback:
        plan.add("column exists", "ExpectColumnToExist", columns=[col], requires=(), column=col)
    for col, dtype in INTERACTION_DTYPES.items():
        if col in (RATING, LABEL, IMPRESSION_ID) and col not in frame.columns:
            continue  # optional columns
        rule = f"column type is {dtype}"
        nullable = NULLABLE_DTYPES.get(col)
        if nullable and col in frame.columns and str(frame[col].dtype) == nullable:
            # ingest keeps a timestamp column holding nulls as Int64: the not-null rule
            # points at those rows, so the dtype itself is accepted
            dtype, rule = nullable, f"column type is {dtype} (or {nullable} while it holds nulls)"
        plan.add(rule, "ExpectColumnTypeToBe", columns=[col], column=col, type_=dtype)
    for col in (USER_ID, ITEM_ID, TIMESTAMP):
        plan.add("value is not null", "ExpectColumnValuesToNotBeNull", columns=[col], column=col)

    for col in (USER_ID, ITEM_ID, IMPRESSION_ID):
        if col in frame.columns or col != IMPRESSION_ID:  # impression_id is optional
            plan.add(f"{col} is valid UTF-8 (no U+FFFD replacement character)",
                     "ExpectColumnValuesToNotMatchRegex", columns=[col], column=col,
                     regex=REPLACEMENT_CHAR)
    lo, hi = p.timestamp_bounds()
    plan.add(f"timestamp is between {p.timestamp_min} and {p.timestamp_max} (unix {lo}..{hi})",
             "ExpectColumnValuesToBeBetween", columns=[TIMESTAMP], column=TIMESTAMP,
             min_value=lo, max_value=hi)
    if RATING in frame.columns:
        plan.add(f"rating is between {p.rating_min:g} and {p.rating_max:g}",
                 "ExpectColumnValuesToBeBetween", columns=[RATING], column=RATING,
                 min_value=p.rating_min, max_value=p.rating_max)
    if LABEL in frame.columns:
        plan.add("label is 0 or 1", "ExpectColumnValuesToBeInSet", columns=[LABEL], column=LABEL,
                 value_set=[0, 1])
    if len(feedback) == 2:
        from great_expectations.expectations.row_conditions import Column

        plan.add("each row has a rating or a label (rating is not null where label is null)",
                 "ExpectColumnValuesToNotBeNull", columns=[RATING, LABEL], column=RATING,
                 row_condition=Column(LABEL).is_null())
    elif len(feedback) == 1:
        plan.add(f"each row has a {feedback[0]} (the only feedback column)",
                 "ExpectColumnValuesToNotBeNull", columns=feedback, column=feedback[0])

    key = [c for c in EVENT_KEY if c in frame.columns]
    plan.add(f"events are unique on ({', '.join(key)})", "ExpectCompoundColumnsToBeUnique",
             columns=key, requires=(USER_ID, ITEM_ID, TIMESTAMP), column_list=key,
             ignore_row_if="never")
    if ITEM_EXISTS in frame.columns:
        plan.add("item_id exists in items", "ExpectColumnValuesToBeInSet", columns=[ITEM_ID],
                 requires=(ITEM_ID, ITEM_EXISTS), column=ITEM_EXISTS, value_set=[True])
    else:
        plan.skip("item_id exists in items", [ITEM_ID],
                  "item_id column missing in " + ("items" if item_ids is None else "interactions"))
    return [plan]
