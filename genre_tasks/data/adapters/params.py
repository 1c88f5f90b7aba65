"""The ``ingest`` section of params.yaml as frozen dataclasses (read by the ``source`` and
``ingest`` stages, the adapters and the feedback loop), and the ISO date helpers its ``until``
uses. They live here, below the adapters, so nothing that reads them imports a stage."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

from genre_tasks.config import ParamsError


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

    #: movielens-100k | mind | tabular (see genre_tasks.data.adapters.ADAPTERS)
    adapter: str = "movielens-100k"
    #: keep only the N users with the smallest ids (numeric order if all ids are digits)
    max_users: int | None = None
    #: ISO date/datetime (UTC unless it has an offset) or None: keep only the base interactions
    #: *before* it (the feedback store's parts are appended regardless); the initial store of
    #: a replay (`genre feedback replay --init`). An unquoted YAML date is accepted too.
    until: str | dt.date | None = None
    mind: MindParams = field(default_factory=MindParams)
    tabular: TabularParams = field(default_factory=TabularParams)
    #: genre values that mean "no genre" (compared stripped, case-insensitively); removed
    no_genre_tokens: tuple[str, ...] = ("(no genres listed)",)

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
