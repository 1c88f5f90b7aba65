"""Validate stage: Great Expectations suites over the raw ``items`` and ``interactions`` tables.

The ingest adapters are lenient (an empty file gives an empty table, a missing source column a
missing canonical column, a bad number a null, a non-UTF-8 byte the U+FFFD character), so this
stage is where bad data is rejected. Three GX 1.x suites run in one ephemeral context:

``items``         row count, required columns, dtypes, non-null unique ``item_id``, non-blank
                  ``title``/``text``, text length bounds, no U+FFFD, ``genres`` is a list
``item_genres``   ``genres`` exploded (one row per item genre, indexed by the item's row):
                  every genre is a string and, if ``genre_vocabulary`` is set, in it
``interactions``  row count, required columns, dtypes, non-null ids and timestamps, rating
                  bounds, label in {0, 1}, a rating or a label per row, timestamp bounds,
                  unique events, and every ``item_id`` present in items

On success it writes ``data/validation/summary.json`` (per table: success, expectation counts,
rows, each expectation with its result), Data Docs HTML in ``data/validation/docs/`` and
``metrics/validate.json``. On failure it writes none of them (a stale ``summary.json`` is
removed at the start, so preprocess cannot run on it), writes ``data/validation/failure.json``
and raises :class:`~genre_tasks.errors.DataValidationError` whose message names the table, the
file, each broken rule with its column, the unexpected count and sample rows (0-based row
numbers of the raw table) with their values.

``great_expectations`` is imported inside functions: importing it takes ~3 s.
"""
from __future__ import annotations

import dataclasses
import logging
import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from genre_tasks import config, io, logs
from genre_tasks.errors import DataValidationError, StageError
from genre_tasks.schema import (
    GENRES,
    IMPRESSION_ID,
    INTERACTION_DTYPES,
    SOURCE_FILE,
    SOURCE_LINE,
    ITEM_COLUMNS,
    ITEM_ID,
    LABEL,
    RATING,
    TEXT,
    TIMESTAMP,
    TITLE,
    USER_ID,
    Paths,
)

STAGE = "validate"

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

#: GX result statistics summed per table and over the run
COUNTS = ("evaluated_expectations", "successful_expectations", "unsuccessful_expectations")
SUITE_ITEMS = "items"
SUITE_ITEM_GENRES = "item_genres"
SUITE_INTERACTIONS = "interactions"
DOCS_SITE = "validate"
#: Longest string shown for a value in messages (the rest is cut with an ellipsis).
MAX_VALUE_CHARS = 80


# --------------------------------------------------------------------------------------
# params
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ValidateParams:
    """The ``validate`` section of params.yaml.

    Bounds are inclusive. ``timestamp_min``/``timestamp_max`` are ISO dates or datetimes
    (UTC unless they carry an offset), compared with the unix-seconds ``timestamp`` column.
    ``genre_vocabulary`` None allows any genre. ``sample_rows`` offending rows are reported
    per failed expectation.
    """

    rating_min: float = 0.0
    rating_max: float = 5.0
    timestamp_min: str = "1990-01-01"
    timestamp_max: str = "2030-01-01"
    text_min_chars: int = 1
    text_max_chars: int = 20000
    genre_vocabulary: tuple[str, ...] | None = None
    sample_rows: int = 5
    #: reject: any broken rule stops the pipeline; quarantine: rows breaking row-level rules
    #: go to data/validation/quarantine.csv (with the reasons) and the rest proceeds
    on_bad_rows: Literal["reject", "quarantine"] = "reject"
    #: quarantine: more bad rows than this share of a table still rejects it
    max_bad_rows_fraction: float = 0.01

    def validate(self) -> None:
        """Raise :class:`config.ParamsError` on inconsistent values."""
        for name in ("rating_min", "rating_max"):
            if not math.isfinite(getattr(self, name)):
                raise config.ParamsError(f"validate.{name}: must be a finite number")
        if self.rating_min > self.rating_max:
            raise config.ParamsError(
                f"validate: rating_min {self.rating_min} > rating_max {self.rating_max}")
        lo, hi = self.timestamp_bounds()
        if lo > hi:
            raise config.ParamsError(
                f"validate: timestamp_min {self.timestamp_min} is after "
                f"timestamp_max {self.timestamp_max}")
        if self.text_min_chars < 0 or self.text_max_chars < self.text_min_chars:
            raise config.ParamsError(
                f"validate: need 0 <= text_min_chars ({self.text_min_chars}) <= text_max_chars "
                f"({self.text_max_chars})")
        if not 0.0 <= self.max_bad_rows_fraction <= 1.0:
            raise config.ParamsError("validate.max_bad_rows_fraction: must be in [0, 1], got "
                                     f"{self.max_bad_rows_fraction}")
        if self.sample_rows < 1:
            raise config.ParamsError(f"validate.sample_rows: must be >= 1, got {self.sample_rows}")
        if self.genre_vocabulary is not None:
            bad = [g for g in self.genre_vocabulary if not isinstance(g, str) or not g]
            if bad or not self.genre_vocabulary:
                raise config.ParamsError(
                    "validate.genre_vocabulary: must be null or a non-empty list of non-empty "
                    f"strings, bad entries {bad!r}")

    def timestamp_bounds(self) -> tuple[int, int]:
        """``(timestamp_min, timestamp_max)`` as unix seconds."""
        return (_epoch(self.timestamp_min, "timestamp_min"),
                _epoch(self.timestamp_max, "timestamp_max"))


def _epoch(value: str, name: str) -> int:
    try:
        moment = dt.datetime.fromisoformat(str(value))
    except ValueError as exc:
        raise config.ParamsError(f"validate.{name}: {value!r} is not an ISO date ({exc})") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return int(moment.timestamp())


# --------------------------------------------------------------------------------------
# suite building (pure pandas + GX expectation objects; no context needed)
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# running GX and reporting
# --------------------------------------------------------------------------------------
def run_suites(plans: list[SuitePlan], p: ValidateParams,
               docs_dir: Path | None = None) -> dict[str, Any]:
    """Run each plan's suite in one ephemeral GX context; return ``{suite name: GX result}``.

    When ``docs_dir`` is given and every suite passed, Data Docs (index.html, suite and
    validation pages) are built into it.
    """
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # this GX module sets its own logger to INFO at import (one line per ephemeral context)
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = ctx.data_sources.add_pandas("raw")
    run_id = RunIdentifier(run_name=STAGE)
    # quarantine needs every offending row (COMPLETE); reject only the samples (SUMMARY)
    result_format = {"result_format": "COMPLETE" if p.on_bad_rows == "quarantine" else "SUMMARY",
                     "partial_unexpected_count": p.sample_rows}
    results: dict[str, Any] = {}
    for plan in plans:
        asset = source.add_dataframe_asset(plan.name)
        batch = asset.add_batch_definition_whole_dataframe(plan.name)
        suite = ctx.suites.add(gx.ExpectationSuite(
            name=plan.name, expectations=[c.expectation for c in plan.checks],
            meta={"table": plan.table}))
        definition = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=plan.name, data=batch, suite=suite))
        results[plan.name] = definition.run(batch_parameters={"dataframe": plan.frame},
                                            result_format=result_format, run_id=run_id)
    if docs_dir is not None and (all(r.success for r in results.values())
                                 or p.on_bad_rows == "quarantine"):
        ctx.add_data_docs_site(DOCS_SITE, {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(Path(docs_dir).resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        ctx.build_data_docs(site_names=[DOCS_SITE])
    return results


def build_report(tables: dict[str, dict], plans: list[SuitePlan], results: dict[str, Any],
                 p: ValidateParams) -> dict:
    """JSON-able report: per table success, counts, rows and every expectation's outcome.

    ``tables`` maps table name -> ``{"path": str, "frame": DataFrame}`` (the normalized raw
    table whose row numbers samples refer to). Failed expectations carry ``samples``.
    """
    report: dict[str, Any] = {"tables": {}}
    for name, info in tables.items():
        frame = info["frame"]
        entry: dict[str, Any] = {
            "path": info["path"], "rows": int(len(frame)),
            "columns": [str(c) for c in frame.columns],
            "evaluated_expectations": 0, "successful_expectations": 0,
            "unsuccessful_expectations": 0, "expectations": [], "skipped": [],
        }
        if info.get("lines") is not None:
            entry["source_files"] = sorted(set(info["lines"][SOURCE_FILE].dropna().astype(str)))
        for plan in (pl for pl in plans if pl.table == name):
            result = results[plan.name]
            stats = result.statistics
            for k in COUNTS:
                entry[k] += int(stats[k])
            by_key = {r.expectation_config.meta.get("check"): r for r in result.results}
            for check in plan.checks:
                entry["expectations"].append(
                    _expectation_entry(plan, check, by_key[check.key], frame, p.sample_rows,
                                       info.get("lines")))
            entry["skipped"].extend(plan.skipped)
        entry["success"] = all(e["success"] for e in entry["expectations"])
        report["tables"][name] = entry
    report["success"] = all(t["success"] for t in report["tables"].values())
    for k in COUNTS[:2]:
        report[k] = sum(t[k] for t in report["tables"].values())
    report["params"] = _jsonable(dataclasses.asdict(p))
    return report


def add_failure(report: dict, rule: str, detail: str) -> dict:
    """Append a failed batch-level rule to a GX report (e.g. found at apply time, or a whole-table rule)."""
    table = report["tables"]["interactions"]
    table["expectations"].append({"suite": "batch", "rule": rule, "column": None,
                                  "expectation": "batch_rule", "kwargs": {}, "success": False,
                                  "unit": "rows", "error": detail})
    table["evaluated_expectations"] += 1
    table["unsuccessful_expectations"] += 1
    table["success"] = report["success"] = False
    return report


def _expectation_entry(plan: SuitePlan, check: Check, result: Any, frame: pd.DataFrame,
                       sample_rows: int, lines: pd.DataFrame | None = None) -> dict:
    config_ = result.expectation_config
    res = dict(result.result or {})
    entry: dict[str, Any] = {
        "suite": plan.name,
        "rule": check.rule,
        "column": ", ".join(check.columns) or None,
        "expectation": config_.type,
        "kwargs": _jsonable({k: v for k, v in config_.kwargs.items() if k != "batch_id"}),
        "success": bool(result.success),
        "unit": plan.unit,
    }
    for k in ("observed_value", "element_count", "unexpected_count", "missing_count"):
        if k in res:
            entry[k] = _jsonable(res[k])
    if not result.success and res.get("unexpected_index_list") is not None:
        entry["bad_rows"] = sorted({int(r) for r in res["unexpected_index_list"]})  # COMPLETE
    error = _exception_message(result.exception_info)
    if error:
        entry["error"] = error
    if not result.success:
        # distinct unexpected values among the first ``sample_rows`` offending rows (the
        # derived True/False column of the item_id rule says nothing: its samples show item_id)
        if res.get("partial_unexpected_list") and config_.kwargs.get("column") != ITEM_EXISTS:
            values = [_jsonable(v) for v in res["partial_unexpected_list"]]
            entry["unexpected_values"] = [v for i, v in enumerate(values) if v not in values[:i]]
        rows = list(dict.fromkeys(res.get("partial_unexpected_index_list") or []))[:sample_rows]
        show = [c for c in (*plan.context_columns, *check.columns) if c in frame.columns]
        show = list(dict.fromkeys(show))
        entry["samples"] = [
            {"row": int(r), "values": {c: _jsonable(frame.at[r, c]) for c in show},
             **({"source": _source(lines, int(r))} if lines is not None else {})}
            for r in rows if r in frame.index
        ]
    return entry


def _source(lines: pd.DataFrame, row: int) -> dict | None:
    """``{"file", "line"}`` of raw row ``row`` in the user's files (None when unknown)."""
    if row < 0 or row >= len(lines):
        return None
    file, line = lines.iat[row, 0], lines.iat[row, 1]
    if file is None or file is pd.NA or pd.isna(line):
        return None
    unit = "row" if str(file).lower().endswith((".parquet", ".pq")) else "line"
    return {"file": str(file), "line": int(line), "unit": unit}


def table_lines(lines: pd.DataFrame | None, table: str, n_rows: int) -> pd.DataFrame | None:
    """The part of ingest's side table for ``table``: row -> (source_file, source_line)
    (None when there is none, or it does not match the table's length)."""
    if lines is None or not len(lines):
        return None
    part = lines[lines["table"] == table].sort_values("row")
    if len(part) != n_rows:
        return None
    return part[[SOURCE_FILE, SOURCE_LINE]].reset_index(drop=True)


def _exception_message(info: Any) -> str | None:
    """First exception message in GX ``exception_info`` (flat, or keyed by metric id)."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "exception")
    for value in info.values():
        msg = _exception_message(value)
        if msg:
            return msg
    return None


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays, pandas NA/NaN -> None, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str):
        return _jsonable(value.tolist())
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item"):
        return _jsonable(value.item())
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def _show(value: Any, column: str = "") -> str:
    """Short printable form of a sample value; U+FFFD is spelled out, timestamps get a date."""
    if column == TIMESTAMP and isinstance(value, int) and not isinstance(value, bool):
        try:
            when = dt.datetime.fromtimestamp(value, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        except (OverflowError, OSError, ValueError):
            when = "out of range"
        return f"{value} ({when} UTC)"
    if isinstance(value, str):
        text = value if len(value) <= MAX_VALUE_CHARS else value[:MAX_VALUE_CHARS] + "..."
        return repr(text).replace(REPLACEMENT_CHAR, "\\ufffd")
    return repr(value)


def format_failure(report: dict) -> str:
    """Human-readable failure message: per table (and file) each broken rule with samples."""
    failed = [e for t in report["tables"].values() for e in t["expectations"] if not e["success"]]
    samples = [s for e in failed for s in e.get("samples", [])]
    located = all(s.get("source") for s in samples)
    lines = [f"data validation failed: {len(failed)} expectation(s) broken "
             + ("(each row: your file and its 1-based line, or row of a parquet file)" if located
                else "(row = 0-based row number in the file)")]
    for name, table in report["tables"].items():
        bad = [e for e in table["expectations"] if not e["success"]]
        if table.get("source_files"):
            head = (f"table {name} (from {', '.join(table['source_files'])}; {table['rows']} rows,"
                    f" checked as {table['path']})")
        else:
            head = f"table {name} ({table['path']}, {table['rows']} rows)"
        if not bad:
            lines.append(f"{head}: all {table['evaluated_expectations']} expectations passed")
            continue
        lines.append(f"{head}: {len(bad)} of {table['evaluated_expectations']} expectations failed")
        for e in bad:
            where = f"column {e['column']}" if e["column"] else "table"
            lines.append(f"  - FAILED {where}: {e['rule']} [{e['expectation']}]")
            if e.get("error") and e["expectation"] == "batch_rule":
                lines += [f"      {line.strip()}" for line in e["error"].splitlines()]
            elif e.get("error"):
                lines.append(f"      could not be evaluated: {e['error']}")
            if "unexpected_count" in e:
                total = e.get("element_count", "?")
                lines.append(f"      {e['unexpected_count']} unexpected of {total} {e['unit']}")
            elif "observed_value" in e:
                lines.append(f"      observed: {e['observed_value']!r}")
            elif e["expectation"] == "expect_column_to_exist":
                have = ", ".join(table["columns"]) or "(none)"
                lines.append(f"      column missing; table columns: {have}")
            if any(v is not None for v in e.get("unexpected_values", [])):
                vals = ", ".join(_show(v) for v in e["unexpected_values"])
                lines.append(f"      unexpected values (sample): {vals}")
            for s in e.get("samples", []):
                vals = ", ".join(f"{k}={_show(v, k)}" for k, v in s["values"].items())
                src = s.get("source")
                where = (f"{src['file']} {src['unit']} {src['line']}" if src
                         else f"row {s['row']}")
                lines.append(f"      {where}: {vals}")
        for s in table["skipped"]:
            lines.append(f"  - skipped: {s['rule']}"
                         + (f" (column {s['column']})" if s["column"] else "") + f": {s['reason']}")
    if report.get("failure_report"):
        lines.append(f"full report: {report['failure_report']}")
    return "\n".join(lines)


def _log_report(report: dict, log: logs.StageLog) -> None:
    """The GX summary, one line per expectation (visible in the Airflow task log)."""
    for name, table in report["tables"].items():
        log.logger.info("GX %s (%s, %d rows): %d/%d expectations passed%s", name, table["path"],
                        table["rows"], table["successful_expectations"],
                        table["evaluated_expectations"],
                        f", {len(table['skipped'])} skipped" if table["skipped"] else "")
        for e in table["expectations"]:
            detail = ""
            if not e["success"]:
                if "unexpected_count" in e:
                    detail = (f": {e['unexpected_count']} unexpected of "
                              f"{e.get('element_count')} {e['unit']}")
                elif "observed_value" in e:
                    detail = f": observed {e['observed_value']!r}"
                if e.get("error"):
                    detail += f" (error: {e['error']})"
            log.logger.log(logging.INFO if e["success"] else logging.ERROR,
                           "  %s %s | %s | %s [%s]%s", "ok  " if e["success"] else "FAIL", name,
                           e["column"] or "table", e["rule"], e["expectation"], detail)


# --------------------------------------------------------------------------------------
# stage
# --------------------------------------------------------------------------------------
def validate_tables(items: pd.DataFrame, interactions: pd.DataFrame, p: ValidateParams, *,
                    items_path: str = "items", interactions_path: str = "interactions",
                    docs_dir: Path | None = None, lines: pd.DataFrame | None = None) -> dict:
    """Validate two raw tables (canonical schema); return the report (never raises on bad data).

    ``report["success"]`` says whether every expectation passed; Data Docs are built into
    ``docs_dir`` only then. Row numbers in samples are positions in the given frames; with
    ``lines`` (ingest's side table) each sample also names its source file and line.
    """
    items = normalize(items, (ITEM_ID, TITLE, TEXT))
    interactions = normalize(interactions, (USER_ID, ITEM_ID, IMPRESSION_ID))
    item_ids = items[ITEM_ID] if ITEM_ID in items.columns else None
    plans = plan_items(items, p) + plan_interactions(interactions, item_ids, p)
    results = run_suites(plans, p, docs_dir)
    tables = {"items": {"path": items_path, "frame": items,
                        "lines": table_lines(lines, "items", len(items))},
              "interactions": {"path": interactions_path, "frame": interactions,
                               "lines": table_lines(lines, "interactions", len(interactions))}}
    return build_report(tables, plans, results, p)


def failure_path(paths: Paths) -> Path:
    """Where the failure report of the last failed validation goes (not a DVC out)."""
    return paths.validation_dir / "failure.json"


def docs_path(paths: Paths) -> Path:
    """Data Docs site (index.html) of the last successful validation."""
    return paths.validation_dir / "docs"


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _read(path: Path, table: str, root: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataValidationError(f"table {table} ({_rel(path, root)}): file not found; "
                                  "run ingest first",
                                  {"success": False, "table": table, "path": str(path)})
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any reader error means an unreadable input
        raise DataValidationError(f"table {table} ({_rel(path, root)}): cannot read parquet: {exc}",
                                  {"success": False, "table": table, "path": str(path)}) from exc


def quarantine_path(paths: Paths) -> Path:
    """The bad-rows report of ``validate.on_bad_rows: quarantine`` (rows, reasons, source).
    A DVC output of validate: written on every pass (header only when nothing was set aside),
    so a run whose validate DVC restores from its run cache still has it."""
    return paths.validation_dir / "quarantine.csv"


#: the first columns of quarantine.csv (then the row's key values)
QUARANTINE_COLUMNS = ["table", "row", "source_file", "source_line", "reasons"]


def bad_rows(report: dict) -> dict[str, dict[int, list[str]]] | None:
    """``{table: {row: [reasons]}}`` of the broken row-level rules (and pops the full row
    lists out of the report); None when a broken rule is about a whole table (a missing
    column, a dtype, the row count...), which no quarantine can fix."""
    out: dict[str, dict[int, list[str]]] = {name: {} for name in report["tables"]}
    whole_table = False
    for name, table in report["tables"].items():
        for e in table["expectations"]:
            rows = e.pop("bad_rows", None)
            if e["success"]:
                continue
            if rows is None:
                whole_table = True
                continue
            for r in rows:
                out[name].setdefault(r, []).append(f"{e['column'] or 'table'}: {e['rule']}")
    return None if whole_table else out


UNPARSED_RULE = "every value parses (a time, a number, a label)"


def unparsed_failure(unparsed: pd.DataFrame) -> str:
    """The detail of the failure for rows ingest left out because a value did not parse."""
    shown = [f"{r.source_file} line {r.source_line}, column {r.column}: {r.value} - rule: "
             f"{r.rule}" for r in unparsed.head(10).itertuples()]
    more = f"; ... and {len(unparsed) - 10} more" if len(unparsed) > 10 else ""
    return (f"{len(unparsed)} value(s) do not parse (ingest left their rows out under "
            f"validate.on_bad_rows: quarantine): " + "; ".join(shown) + more)


def quarantine(report: dict, p: ValidateParams, frames: dict[str, pd.DataFrame],
               lines: dict[str, pd.DataFrame | None], kept: np.ndarray | None,
               target: Path, root: Path, unparsed: pd.DataFrame | None = None) -> bool:
    """Apply ``on_bad_rows: quarantine`` to a failed report; True when the rest may proceed.

    Interactions whose item is quarantined are quarantined too. Over
    ``max_bad_rows_fraction`` of a table, or a whole-table rule broken: False (reject; the
    report then says why). Else the bad rows go to ``target`` (CSV: table, row, source file
    and line, reasons, the row's key values) and ``report["quarantine"]`` lists the rows of
    data/raw/{items,interactions}.parquet that preprocess drops (``kept`` maps validated
    interaction rows to rows of the slice, -1 = not in it).

    ``unparsed`` (ingest's ``data/raw/unparsed.parquet``): source rows whose value did not
    parse, already left out of the raw tables; they count as bad rows of their table (also for
    ``max_bad_rows_fraction``, over the table's rows + them) and are listed in ``target``
    (no raw ``row``; their file, line, column, raw value and rule).
    """
    bad = bad_rows(report)
    if bad is None:
        report["quarantine"] = {"policy": "quarantine", "applied": False,
                                "reason": "a whole-table rule is broken"}
        return False
    items, inter = frames["items"], frames["interactions"]
    if bad["items"] and ITEM_ID in items.columns and ITEM_ID in inter.columns:
        gone = set(items[ITEM_ID].iloc[sorted(bad["items"])].dropna())
        for r in np.flatnonzero(inter[ITEM_ID].isin(gone).to_numpy(dtype=bool)):
            bad["interactions"].setdefault(int(r), []).append("item_id: its item is quarantined")
    if unparsed is None:
        unparsed = pd.DataFrame(columns=["table", "source_file", "source_line", "column",
                                         "value", "rule"])
    n_unparsed = {name: int(len(unparsed[unparsed["table"] == name]
                                .drop_duplicates(["source_file", "source_line"])))
                  for name in bad}
    over = {name: (len(rows) + n_unparsed[name], len(frames[name]) + n_unparsed[name])
            for name, rows in bad.items()
            if len(frames[name]) + n_unparsed[name] and len(rows) + n_unparsed[name] >
            p.max_bad_rows_fraction * (len(frames[name]) + n_unparsed[name])}
    counts = {name: len(rows) + n_unparsed[name] for name, rows in bad.items()}
    if over:
        for name, (n, total) in over.items():
            add_failure(report, f"bad rows are at most validate.max_bad_rows_fraction "
                        f"({p.max_bad_rows_fraction:.2%}) of a table (on_bad_rows: quarantine)",
                        f"table {name}: {n} of {total} rows ({n / total:.2%}) break a rule")
        report["quarantine"] = {"policy": "quarantine", "applied": False, "bad_rows": counts,
                                "unparsed_rows": n_unparsed,
                                "reason": "over max_bad_rows_fraction"}
        return False
    records = []
    for (name, file, line), group in unparsed.groupby(["table", "source_file", "source_line"],
                                                     sort=True):
        records.append({"table": name, "row": None, "source_file": file,
                        "source_line": int(line),
                        "reasons": "; ".join(f"{g.column}: {g.rule} (raw value {g.value}; the "
                                             f"row was not read)" for g in group.itertuples())})
    for name, rows in bad.items():
        frame, src = frames[name], lines.get(name)
        show = [c for c in (ITEM_ID, TITLE, USER_ID, TIMESTAMP, RATING, LABEL, IMPRESSION_ID)
                if c in frame.columns and (name == "interactions" or c in (ITEM_ID, TITLE))]
        for r in sorted(rows):
            where = _source(src, r) if src is not None else None
            records.append({"table": name, "row": r,
                            "source_file": where["file"] if where else None,
                            "source_line": where["line"] if where else None,
                            "reasons": "; ".join(dict.fromkeys(rows[r])),
                            **{c: _jsonable(frame.at[r, c]) for c in show}})
    with io.atomic_path(target) as tmp:
        pd.DataFrame(records, dtype=object).to_csv(tmp, index=False)  # ints stay ints
    inter_rows = sorted(bad["interactions"])
    if kept is not None:
        inter_rows = sorted(int(kept[r]) for r in inter_rows if kept[r] >= 0)
    report["quarantine"] = {"policy": "quarantine", "applied": True, "bad_rows": counts,
                            "unparsed_rows": n_unparsed,
                            "file": _rel(target, root), "items_rows": sorted(bad["items"]),
                            "interactions_rows": inter_rows}
    report["success"] = True
    return True


def raw_hashes(paths: Paths) -> dict[str, str]:
    """md5 of the raw tables a validation vouches for (relative path -> md5)."""
    files = [paths.raw_items, paths.raw_interactions, paths.raw_input_interactions]
    return {_rel(f, paths.root): io.file_md5(f) for f in files if f.is_file()}


def require_current(summary: dict, paths: Paths) -> None:
    """Refuse (StageError) raw tables that changed after the validation in ``summary`` (e.g.
    ingest re-ran, validate did not): the stage reading them says what to re-run."""
    old = summary.get("raw_md5")
    if old is None:  # a summary from before raw hashes were recorded
        return
    now = raw_hashes(paths)
    changed = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
    if changed:
        raise StageError(f"{', '.join(changed)} changed since validation passed on them; re-run "
                         "`genre validate` (or `dvc repro`) first")


def drop_quarantined(summary: dict, items: pd.DataFrame,
                     interactions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The raw tables without the rows validation quarantined (``summary.json``'s
    ``quarantine``; row numbers of data/raw/{items,interactions}.parquet)."""
    q = summary.get("quarantine") or {}
    if not q.get("applied"):
        return items, interactions
    items = items.drop(index=items.index[q["items_rows"]]).reset_index(drop=True)
    interactions = interactions.drop(
        index=interactions.index[q["interactions_rows"]]).reset_index(drop=True)
    return items, interactions


def _metrics(report: dict) -> dict:
    t = report["tables"]
    return {
        "success": report["success"],
        "items_rows": t["items"]["rows"],
        "interactions_rows": t["interactions"]["rows"],
        "expectations_evaluated": report["evaluated_expectations"],
        "expectations_successful": report["successful_expectations"],
        **({"quarantined_" + k: v for k, v in report["quarantine"]["bad_rows"].items()}
           if (report.get("quarantine") or {}).get("applied") else {}),
        **({"slice_rows_kept": report["slice"].get("rows_kept"),
            "slice_rows_dropped": report["slice"].get("rows_dropped")}
           if report.get("slice") else {}),
    }


def run(p: ValidateParams, paths: Paths, ingest_params: Any = None) -> dict:
    """Validate everything ingest read; write summary, Data Docs and metrics.

    The interactions checked are ALL the interactions the user gave: ingest's
    ``input_interactions.parquet`` when ``ingest.max_users`` / ``ingest.until`` sliced them
    (the slice in ``interactions.parquet`` is a subset of rows validated here; the summary
    reports its kept / dropped counts and an empty slice is refused), else
    ``interactions.parquet``. Samples in messages name the user's file and line (ingest's
    ``lines.parquet``). Refuses (StageError) raw tables that are stale with respect to the
    source files or the ``ingest`` params (``ingest_params``): re-run ``genre ingest``.

    Raises :class:`DataValidationError` (after writing ``failure.json``) when any rule is broken;
    then no summary, docs or metrics are written and a stale summary.json is gone.
    """
    from genre_tasks.data import ingest

    with logs.stage(STAGE, paths) as log:
        # A stale summary must never outlive a failed (or crashed) run: preprocess depends on it.
        for stale in (paths.validation_summary, failure_path(paths)):
            stale.unlink(missing_ok=True)
        reasons = ingest.stale_inputs(paths, ingest_params)
        if reasons:
            raise StageError("data/raw is stale: " + "; ".join(reasons) + ". Re-run `genre "
                             "ingest` (or `dvc repro validate`, which re-runs source and ingest "
                             "first), then validate.")
        manifest = io.read_json(paths.raw_manifest) if paths.raw_manifest.is_file() else {}
        sliced = paths.raw_input_interactions.is_file()
        items_file = paths.raw_items
        inter_file = paths.raw_input_interactions if sliced else paths.raw_interactions
        items = _read(items_file, "items", paths.root)
        log.read(items_file, f"{len(items)} items")
        interactions = _read(inter_file, "interactions", paths.root)
        log.read(inter_file, f"{len(interactions)} interactions"
                 + (" (all given, before slicing)" if sliced else ""))
        lines = None
        if paths.raw_lines.is_file():
            lines = pd.read_parquet(paths.raw_lines)
            log.read(paths.raw_lines, "source file + line of each raw row")
        unparsed = None
        if paths.raw_unparsed.is_file():
            unparsed = pd.read_parquet(paths.raw_unparsed)
            log.read(paths.raw_unparsed, f"{len(unparsed)} value(s) that did not parse "
                     "(rows left out by ingest)")

        docs = docs_path(paths)
        with io.atomic_dir(docs) as tmp_docs:  # replaces docs/ only if the block completes
            report = validate_tables(items, interactions, p,
                                     items_path=_rel(items_file, paths.root),
                                     interactions_path=_rel(inter_file, paths.root),
                                     docs_dir=tmp_docs, lines=lines)
            sl = manifest.get("slice")
            if sl:
                report["slice"] = sl
                log.logger.info("slice (ingest.until=%s, ingest.max_users=%s) of the validated "
                                "interactions: kept %s, dropped %s (%s users kept)", sl.get("until"),
                                sl.get("max_users"), sl.get("rows_kept"), sl.get("rows_dropped"),
                                sl.get("users_kept"))
                if sl.get("rows_in") and not sl.get("rows_kept"):  # (the cut may empty the table)
                    add_failure(report, "the slice (ingest.until / ingest.max_users) keeps at "
                                "least 1 interaction", f"all {sl['rows_in']} interactions were "
                                "dropped by the slice; widen ingest.until / ingest.max_users")
            if unparsed is not None and len(unparsed) and p.on_bad_rows != "quarantine":
                # ingest ran under quarantine, validate under reject: those rows are refused
                add_failure(report, UNPARSED_RULE, unparsed_failure(unparsed))
            _log_report(report, log)
            quarantine_path(paths).unlink(missing_ok=True)
            has_unparsed = unparsed is not None and len(unparsed) > 0
            if (not report["success"] or has_unparsed) and p.on_bad_rows == "quarantine":
                kept = None
                if lines is not None and "kept_row" in lines.columns:
                    part = lines[lines["table"] == "interactions"].sort_values("row")
                    kept = part["kept_row"].to_numpy() if len(part) == len(interactions) else None
                frames = {"items": normalize(items, ()), "interactions":
                          normalize(interactions, ())}
                located = {t: table_lines(lines, t, len(frames[t])) for t in frames}
                if quarantine(report, p, frames, located, kept, quarantine_path(paths),
                              paths.root, unparsed=unparsed):
                    q = report["quarantine"]
                    log.logger.warning("on_bad_rows=quarantine: %s bad item(s), %s bad "
                                       "interaction(s) quarantined to %s; the rest proceeds",
                                       q["bad_rows"]["items"], q["bad_rows"]["interactions"],
                                       q["file"])
                    log.wrote(quarantine_path(paths), "quarantined rows with reasons")
            for table in report["tables"].values():
                for e in table["expectations"]:
                    e.pop("bad_rows", None)
            if not report["success"]:
                report["failure_report"] = _rel(failure_path(paths), paths.root)
                io.write_json(report, failure_path(paths))
                log.wrote(failure_path(paths), "failure report")
                raise DataValidationError(format_failure(report), report)
            if not (tmp_docs / "index.html").exists():
                raise StageError(f"GX built no Data Docs (no index.html in {tmp_docs})")
        log.wrote(docs, "Data Docs")
        if not quarantine_path(paths).exists():  # a DVC output: nothing set aside = header only
            with io.atomic_path(quarantine_path(paths)) as tmp:
                pd.DataFrame(columns=QUARANTINE_COLUMNS).to_csv(tmp, index=False)
        report["raw_md5"] = raw_hashes(paths)  # what the next stages check (require_current)
        io.write_json(report, paths.validation_summary)
        log.wrote(paths.validation_summary, "validation summary")
        io.write_json(_metrics(report), paths.metrics(STAGE))
        log.wrote(paths.metrics(STAGE), "metrics")
        # small summary (an Airflow XCom); the full GX report is in summary.json
        return {**_metrics(report), "summary": _rel(paths.validation_summary, paths.root),
                "seconds": round(log.seconds, 2)}


def main(params: dict, paths: Paths) -> dict:
    """CLI / Airflow entry: validate with the ``validate`` section of ``params`` (the ``ingest``
    section, when present, is compared with what the raw tables were made with)."""
    ingest_params = None
    if "ingest" in params:
        from genre_tasks.data.ingest import IngestParams

        ingest_params = config.section(IngestParams, "ingest", params)
    return run(config.section(ValidateParams, STAGE, params), paths, ingest_params)


__all__: list[str] = [
    "ValidateParams", "run", "main", "validate_tables", "format_failure", "normalize",
    "plan_items", "plan_interactions", "run_suites", "build_report", "failure_path", "docs_path",
]
