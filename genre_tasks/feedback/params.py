"""Feedback params, settings and folder layout: what every feedback step reads."""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genre_tasks import config
from genre_tasks import schema as S

log = logging.getLogger("genre.feedback")


log = logging.getLogger("genre.feedback")

#: batch file types the landing folder accepts
BATCH_SUFFIXES = (".parquet", ".csv")
#: derived boolean column of the batch suite: is the event already in the store?
IN_STORE = "event_in_store"
#: the registry alias that is scored prequentially
CHAMPION = "champion"
#: MLflow tags of a prequential run
TAG_PREQUENTIAL = "genre.prequential"
TAG_BATCH = "genre.feedback.batch"
TAG_VERSION = "genre.model_version"
TAG_MODEL = "genre.model_name"
TAG_SHA1 = "genre.feedback.sha1"
#: metrics shown for a prequential score (means over users / impressions of the batch)
PREQUENTIAL_METRICS = ("ndcg@10", "recall@10", "mrr", "auc")




# --------------------------------------------------------------------------------------
# params and paths
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeedbackParams:
    """The optional ``feedback`` section of params.yaml (defaults apply when it is absent).

    incoming         landing folder of new batch files (relative to the project root)
    workdir          quarantine/, applied/, validated/, prequential/ live under it
    allow_new_items  accept item ids that are not in the current items table (they then need
                     item rows in the source data before the next training run validates)
    prequential      score the @champion on each good batch before it is applied
    dvc              record the store's new version with DVC (commit + push) after applying
    dvc_push         push the recorded version to the default DVC remote
    max_batch_bytes  a batch file larger than this is quarantined unread (limit: bytes)
    max_batch_rows   a batch with more rows than this is quarantined before it is loaded
                     (parquet: from its footer; CSV: counted while parsing)
    """

    incoming: str = "data/feedback/incoming"
    workdir: str = "data/feedback"
    allow_new_items: bool = False
    prequential: bool = True
    dvc: bool = True
    dvc_push: bool = True
    max_batch_bytes: int = 64 * 1024 * 1024
    max_batch_rows: int = 1_000_000

    def validate(self) -> None:
        for name in ("max_batch_bytes", "max_batch_rows"):
            if getattr(self, name) < 1:
                raise config.ParamsError(f"feedback.{name}: must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Settings:
    """Everything the feedback loop reads from params.yaml."""

    feedback: FeedbackParams
    ingest: Any  # ingest.IngestParams
    validate: Any  # validate.ValidateParams
    positive_threshold: float = 4.0
    model_name: str = "genre-recommender"
    seed: int = 42


def settings(params: dict, **overrides: Any) -> Settings:
    """Settings from loaded params; ``overrides`` replace ``feedback`` fields (None = keep)."""
    from genre_tasks.data.ingest import IngestParams
    from genre_tasks.data.validate_params import ValidateParams

    fb = config.from_dict(FeedbackParams, params.get("feedback") or {}, "feedback")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if changes:
        fb = dataclasses.replace(fb, **changes)
    return Settings(
        feedback=fb,
        ingest=config.section(IngestParams, "ingest", params),
        validate=config.section(ValidateParams, "validate", params),
        positive_threshold=float((params.get("preprocess") or {}).get("positive_threshold", 4.0)),
        model_name=str((params.get("promote") or {}).get("model_name", "genre-recommender")),
        seed=int((params.get("evaluate") or {}).get("seed", 42)),
    )


class FeedbackPaths:
    """Where the feedback loop reads and writes (see the module docstring)."""

    def __init__(self, paths: S.Paths, p: FeedbackParams | None = None) -> None:
        p = p or FeedbackParams()
        self.paths = paths
        self.root = paths.root
        self.incoming = _resolve(paths.root, p.incoming)
        self.dir = _resolve(paths.root, p.workdir)

    @property
    def source(self) -> Path:
        return self.paths.source

    @property
    def quarantine(self) -> Path:
        return self.dir / "quarantine"

    @property
    def applied(self) -> Path:
        return self.dir / "applied"

    @property
    def validated(self) -> Path:
        return self.dir / "validated"

    @property
    def prequential(self) -> Path:
        return self.dir / "prequential"

    @property
    def recorded(self) -> Path:
        return self.dir / "recorded.json"

    @property
    def lock(self) -> Path:
        """The store's lock: beside the store (``data/.feedback-store.lock``), not in the
        workdir, so runs with different landing folders / workdirs still exclude each other;
        outside ``data/source`` so DVC never hashes it."""
        return self.source.parent / ".feedback-store.lock"

    def rel(self, path: Path) -> str:
        return _rel(path, self.root)


def _resolve(root: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(root) / p


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def as_datetime(value: str | dt.datetime | dt.date) -> dt.datetime:
    """An aware UTC datetime from an ISO string / datetime / date (naive = UTC)."""
    from genre_tasks.data.ingest import as_utc_datetime

    return as_utc_datetime(value, "logical date")


def _iso(ts: int | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(int(ts), dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
