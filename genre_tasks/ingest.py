"""`ingest` stage: source files (any adapter) -> canonical raw tables in ``data/raw/``.

Reads what the ``source`` stage put under ``Paths.source`` with the adapter named by
``ingest.adapter`` (see :mod:`genre_tasks.adapters`) and writes

* ``Paths.raw_items`` (parquet): ``item_id``, ``title``, ``text`` (string), ``genres``
  (``list<string>``), plus the adapter's extra string columns;
* ``Paths.raw_interactions`` (parquet): ``user_id``, ``item_id`` (string), ``timestamp``
  (int64 unix seconds UTC), ``rating`` (float64, nullable), ``label`` (int8, nullable),
  ``impression_id`` (string, nullable), in source row order.

Feedback: after the adapter's base tables (base interactions cut at ``ingest.until`` when it is
set), the applied batches of the feedback store ``data/source/feedback/`` are appended in
batch-id order (see :mod:`genre_tasks.adapters` and :mod:`genre_tasks.feedback`); the summary
and ``metrics/ingest.json`` say how many batches / rows were added and the newest timestamp.

The adapters are lenient on content (bad values become nulls, missing mapped columns are left
out); rejecting bad data is the job of the ``validate`` stage that reads these files.
The outputs are deterministic: the same input gives byte-identical parquet files.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd

from genre_tasks import config, logs, schema
from genre_tasks.config import ParamsError
from genre_tasks.io import atomic_path, write_json
from genre_tasks.schema import Paths

@dataclass(frozen=True)
class MindParams:
    """``ingest.mind``: MIND files (relative to ``Paths.source``) and how histories are stamped.

    ``history_timestamp``:
      * ``first_impression``: a history click gets the user's earliest impression time - 1 s,
        so every history event precedes all of that user's impressions;
      * ``global_first_impression``: the earliest impression time of the whole log - 1 s
        (all histories precede all impressions, e.g. for a global temporal split).
    """

    news: str = "news.tsv"
    behaviors: str = "behaviors.tsv"
    history_timestamp: Literal["first_impression", "global_first_impression"] = "first_impression"


@dataclass(frozen=True)
class TabularColumns:
    """``ingest.tabular.columns``: canonical column name -> column name in your files.

    ``None`` means "your files have no such column": ``rating``/``label``/``impression_id``
    then become all-null columns, ``genres`` empty lists, ``text`` is built from
    ``text_fields``; ``item_id``/``title``/``user_id``/``timestamp`` are left out (and the
    ``validate`` stage reports them missing).
    """

    item_id: str | None = "item_id"
    title: str | None = "title"
    genres: str | None = "genres"
    user_id: str | None = "user_id"
    timestamp: str | None = "timestamp"
    rating: str | None = "rating"
    label: str | None = None
    impression_id: str | None = None
    #: optional: a ready-made item text column (then ``text_fields`` is not used)
    text: str | None = None


@dataclass(frozen=True)
class TabularParams:
    """``ingest.tabular``: your own items/interactions files (csv, tsv or parquet)."""

    items: str = "items.csv"
    interactions: str = "interactions.csv"
    genre_separator: str = "|"
    #: item columns (canonical names or your column names) joined with ". " into ``text``
    text_fields: tuple[str, ...] = ("title",)
    columns: TabularColumns = field(default_factory=TabularColumns)

    def validate(self) -> None:
        if not self.genre_separator:
            raise ParamsError("ingest.tabular.genre_separator: must be a non-empty string")
        if not self.text_fields and self.columns.text is None:
            raise ParamsError("ingest.tabular.text_fields: empty, and no columns.text is mapped; "
                              "name at least one item column the text is built from")


@dataclass(frozen=True)
class IngestParams:
    """The ``ingest`` section of params.yaml (also read by the ``source`` stage)."""

    #: movielens-100k | mind | tabular (see genre_tasks.adapters.ADAPTERS)
    adapter: str = "movielens-100k"
    #: keep only the N users with the smallest ids (numeric order if all ids are digits)
    max_users: int | None = None
    #: ISO date/datetime (UTC unless it has an offset) or None: keep only the base interactions
    #: *before* it (the feedback store's parts are appended regardless); the initial store of
    #: a replay (`genre feedback replay --init`). An unquoted YAML date is accepted too.
    until: str | dt.date | None = None
    mind: MindParams = field(default_factory=MindParams)
    tabular: TabularParams = field(default_factory=TabularParams)

    def __post_init__(self) -> None:
        if isinstance(self.until, dt.date):  # YAML `until: 1998-03-02` loads as a date
            object.__setattr__(self, "until", self.until.isoformat())

    def validate(self) -> None:
        if self.max_users is not None and self.max_users < 1:
            raise ParamsError(f"ingest.max_users: must be null or >= 1, got {self.max_users}")
        self.until_timestamp()

    def until_timestamp(self) -> int | None:
        """``until`` as unix seconds (None when unset)."""
        return None if self.until is None else iso_timestamp(self.until, "ingest.until")


def as_utc_datetime(value: str | dt.date | dt.datetime, where: str = "date") -> dt.datetime:
    """An aware UTC datetime from an ISO string / datetime / date (naive = UTC); ParamsError
    naming ``where``."""
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, dt.date):
        moment = dt.datetime(value.year, value.month, value.day)
    else:
        try:
            moment = dt.datetime.fromisoformat(str(value).strip())
        except ValueError as exc:
            raise ParamsError(f"{where}: {value!r} is not an ISO date or datetime "
                              "(e.g. 1998-03-02)") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.astimezone(dt.timezone.utc)


def iso_timestamp(value: str | dt.date | dt.datetime, where: str = "date") -> int:
    """An ISO date / datetime (naive = UTC) -> unix seconds; ParamsError naming ``where``."""
    return int(as_utc_datetime(value, where).timestamp())


def arrow_schema(df: pd.DataFrame):
    """The pyarrow schema ``df`` is written with: pandas' own, with ``genres`` as list<string>.

    (pyarrow infers ``null`` for an all-empty object column, e.g. an empty item table.)
    """
    import pyarrow as pa

    sch = pa.Schema.from_pandas(df, preserve_index=False)
    if schema.GENRES in df.columns:
        i = sch.get_field_index(schema.GENRES)
        sch = sch.set(i, pa.field(schema.GENRES, pa.list_(pa.string())))
    return sch


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df`` to parquet atomically with :func:`arrow_schema` (deterministic bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, schema=arrow_schema(df), preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def run(p: IngestParams, paths: Paths) -> dict:
    """Read the source files with adapter ``p.adapter`` (+ the feedback store) and write the
    canonical raw tables and ``metrics/ingest.json``.

    Returns ``{adapter, n_items, n_interactions, n_users, items, interactions, until,
    n_feedback_batches, n_feedback_rows, feedback_batches, max_timestamp, seconds}``.
    Raises :class:`~genre_tasks.errors.StageError` for an unknown adapter or a missing file.
    """
    from genre_tasks import adapters

    with logs.stage("ingest", paths) as log:
        for path in adapters.source_files(p, paths.source):
            log.read(path, f"{p.adapter} source")
        ledger = adapters.read_ledger(paths.source)
        for batch_id in sorted(ledger):
            log.read(adapters.part_path(paths.source, batch_id),
                     f"feedback batch {batch_id}, {ledger[batch_id].get('rows')} rows")
        items, interactions = adapters.load(p, paths.source)
        write_table(items, paths.raw_items)
        log.wrote(paths.raw_items, f"{len(items)} items")
        write_table(interactions, paths.raw_interactions)
        log.wrote(paths.raw_interactions, f"{len(interactions)} interactions")
        n_users = (int(interactions[schema.USER_ID].nunique())
                   if schema.USER_ID in interactions.columns else 0)
        n_feedback = sum(int(e.get("rows", 0)) for e in ledger.values())
        record = {
            "adapter": p.adapter,
            "n_items": int(len(items)),
            "n_interactions": int(len(interactions)),
            "n_users": n_users,
            "until": p.until,
            "n_feedback_batches": len(ledger),
            "n_feedback_rows": n_feedback,
            "feedback_batches": sorted(ledger),
            "max_timestamp": _max_timestamp(interactions),
        }
        write_json(record, paths.metrics("ingest"))
        log.wrote(paths.metrics("ingest"), "ingest metrics (data cutoff, feedback batches)")
        return {
            **record,
            "items": str(paths.raw_items),
            "interactions": str(paths.raw_interactions),
            "seconds": round(log.seconds, 3),
        }


def _max_timestamp(interactions: pd.DataFrame) -> int | None:
    """Newest event time (unix seconds) of the ingested data, None when there is none."""
    if schema.TIMESTAMP not in interactions.columns or not len(interactions):
        return None
    value = interactions[schema.TIMESTAMP].max()
    return None if pd.isna(value) else int(value)


def main(params: dict, paths: Paths) -> dict:
    """CLI entry point (`genre ingest`)."""
    return run(config.section(IngestParams, "ingest", params), paths)
