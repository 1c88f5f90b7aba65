"""The ``validate`` section of params.yaml (:class:`ValidateParams`) and the stage's name.

The rule bounds of the suites (:mod:`genre_tasks.data.expectations`), how many sample rows a
report shows (:mod:`genre_tasks.data.gx_report`) and the bad-rows policy
(:mod:`genre_tasks.data.quarantine`).
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Literal

from genre_tasks import config

#: the stage's name: its params section, log and metrics file, the GX run name
STAGE = "validate"


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
