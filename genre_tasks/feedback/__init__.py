"""Feedback loop: new interaction batches -> validated -> champion scored on them -> the store.

New interactions arrive as batch files in a landing folder; the batch id is the file stem
(``2026-W12.parquet``, ``1998-W10.csv``; only regular files are read, never through a symlink,
each at most ``feedback.max_batch_bytes`` / ``max_batch_rows``; symlinks, fifos, devices and
folders are refused into quarantine unread; hidden and other files are reported, never skipped
silently), the content the canonical interactions schema of
:mod:`genre_tasks.schema` (``user_id``, ``item_id``, ``timestamp`` unix seconds, ``rating`` and/or
``label``, optional ``impression_id``; CSV values are parsed as the adapters do). Each batch goes
through, in batch-id order:

1. **validation** (:func:`validate_batch`): the Great Expectations ``interactions`` suite of
   :mod:`genre_tasks.data.validate` (the same rules as the main data: required columns, dtypes,
   non-null ids, rating / timestamp bounds, label in {0, 1}, unique events within the batch,
   every ``item_id`` known in the current items table, unless ``feedback.allow_new_items``)
   plus the batch rules, added to the same suite: no timestamp after the run's *logical date*
   (passed in, never the wall clock), no event already in the store. A bad batch moves to
   ``quarantine/<batch_id>/`` (the file, ``report.json``, ``message.txt``) and never touches the
   store; a batch id already applied with the same content is recognised (idempotent), with
   other content it is quarantined.
2. **prequential scoring** (:func:`prequential`): before anything is trained on the batch, the
   registered ``@champion`` scores it (global_temporal style: the model never saw these
   interactions; users need a positive history in the store). nDCG@10, Recall@10, MRR (full
   ranking, seen items excluded), AUC (the batch's items of each user as an impression) and the
   user counts go to ``prequential/<batch_id>.json`` and to an MLflow run tagged with the batch.
3. **apply** (:func:`apply_batch`): the batch becomes one store part
   ``data/source/feedback/<batch_id>.parquet``, written atomically (:func:`io.atomic_path`), and
   only then the ledger ``data/source/feedback/applied.json`` gets its entry (atomically). The
   ledger is the commit point: ingest reads ledger-listed parts only, so a crash leaves the
   store without the batch or with all of it; a retry finds the identical part and completes.
   The same batch id twice is applied once. The file is archived in ``applied/<batch_id>/``.
4. **record** (:func:`record_store`): ``dvc commit --force source`` (creates or updates the
   ``source`` entry of dvc.lock: ``data/source`` is that stage's ``persist`` output) and
   ``dvc push source`` to the default remote, so ``dvc repro`` re-runs ingest and everything
   downstream. Without a DVC repository this is skipped with a warning.

Layout (``feedback.incoming`` / ``feedback.workdir`` relative to the project root)::

    data/feedback/incoming/<batch_id>.{parquet,csv}   landing folder
    data/feedback/validated/<batch_id>.json           validation record of a good batch
    data/feedback/quarantine/<batch_id>/              bad batch: file, report.json, message.txt
    data/feedback/applied/<batch_id>/                 applied batch: file, report.json
    data/feedback/prequential/<batch_id>.json         the champion's metrics on the batch
    data/feedback/recorded.json                       batches whose store version DVC recorded
    data/source/feedback/<batch_id>.parquet           the store (DVC output of stage source)
    data/source/feedback/applied.json                 the store's ledger
    data/.feedback-store.lock                         the store's lock (taken before it is read)

Params: an optional ``feedback`` section (:class:`FeedbackParams`), plus ``ingest`` (the
store), ``validate`` (the rules), ``preprocess.positive_threshold``, ``promote.model_name`` and
``evaluate.seed``. ``feedback_cli`` is the ``genre feedback ...`` command.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime as dt
import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from genre_tasks import config, io, logs
from genre_tasks import schema as S
from genre_tasks.errors import StageError

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
    from genre_tasks.data.validate import ValidateParams

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


@contextlib.contextmanager
def store_lock(fp: FeedbackPaths) -> Iterator[None]:
    """Exclusive lock of the store (CLI and DAG may both run). Whoever checks the store and
    then writes it must read it AFTER taking this lock (:func:`apply_batches`)."""
    fp.lock.parent.mkdir(parents=True, exist_ok=True)
    with open(fp.lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """A batch file in the landing folder; ``batch_id`` is its (sanitised) file stem."""

    batch_id: str
    path: Path


class BatchReadError(StageError):
    """A batch file that cannot be read as a table at all."""


def safe_batch_id(stem: str) -> str:
    """The file stem if it is a safe id, else a sanitised one (``bad name`` -> ``bad_name``)."""
    from genre_tasks.data.adapters import BATCH_ID_PATTERN

    if BATCH_ID_PATTERN.fullmatch(stem):
        return stem
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip("._-")[:128] or "unnamed"


def scan_incoming(fp: FeedbackPaths) -> tuple[list[Batch], list[dict]]:
    """Every entry of the landing folder: ``(batches, others)``.

    ``batches``: regular files (not symlinks) with a batch suffix, in batch-id order.
    ``others``: every other entry, each ``{"name", "kind", "reason", "refuse"}`` - nothing in
    the folder is skipped silently. ``refuse`` is True for entries that must never be read
    (symlinks, fifos, devices, sockets, folders): :func:`refuse_entries` moves them (the link
    itself, never its target) to quarantine. Hidden files (``.name``, ``_name``: e.g. an upload
    still being written) and files of another type are reported and left where they are.
    The checks use ``lstat``: a symlink is never followed.
    """
    import stat

    if not fp.incoming.is_dir():
        return [], []
    batches, others = [], []
    for path in sorted(fp.incoming.iterdir()):
        mode = path.lstat().st_mode
        kind = ("symlink" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else
                "folder" if stat.S_ISDIR(mode) else "fifo" if stat.S_ISFIFO(mode) else
                "device" if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else
                "socket" if stat.S_ISSOCK(mode) else "special file")
        if kind != "file":
            others.append({"name": path.name, "kind": kind, "refuse": True,
                           "reason": f"not a regular file ({kind}): batches must be regular files "
                                     "inside the landing folder; it is never read"})
        elif path.name.startswith((".", "_")):
            others.append({"name": path.name, "kind": "hidden", "refuse": False,
                           "reason": "hidden file (name starts with '.' or '_', e.g. an upload in "
                                     "progress): not processed; rename it to submit it as a batch"})
        elif path.suffix.lower() not in BATCH_SUFFIXES:
            others.append({"name": path.name, "kind": "other type", "refuse": False,
                           "reason": f"not a batch file type ({'/'.join(BATCH_SUFFIXES)}): "
                                     "not processed"})
        else:
            batches.append(Batch(safe_batch_id(path.stem), path))
    return sorted(batches, key=lambda b: (b.batch_id, b.path.name)), others


def list_batches(fp: FeedbackPaths) -> list[Batch]:
    """Batch files in the landing folder, in batch-id order; every other entry is reported
    (a warning each, see :func:`scan_incoming`)."""
    batches, others = scan_incoming(fp)
    for o in others:
        log.warning("%s: %s", fp.rel(fp.incoming / o["name"]), o["reason"])
    return batches


def refuse_entries(fp: FeedbackPaths) -> dict[str, str]:
    """Move the landing-folder entries that must never be read (symlinks, fifos, devices,
    folders) to ``quarantine/<name>/`` with a message; ``{name: reason}``.

    The entry itself is renamed (a symlink stays a link, its target is not touched or read).
    When it cannot be moved (another file system) it is left in place and still reported.
    """
    _, others = scan_incoming(fp)
    out = {}
    for o in (o for o in others if o["refuse"]):
        src = fp.incoming / o["name"]
        qid = safe_batch_id(o["name"])
        target = fp.quarantine / qid
        report = failure_report(fp.rel(src), "a batch is a regular file in the landing folder",
                                o["reason"])
        report["failure_report"] = fp.rel(target / "report.json")
        message = f"entry {o['name']} refused\n" + o["reason"]
        try:
            with io.atomic_dir(target) as tmp:
                io.write_json(report, tmp / "report.json")
                (tmp / "message.txt").write_text(message + "\n")
                os.rename(src, tmp / o["name"])  # the entry itself; a link is not followed
        except OSError as exc:
            message += f" (left in place: {exc})"
        log.error("%s REFUSED: %s", fp.rel(src), message)
        out[o["name"]] = o["reason"]
    return out


def batch_files(fp: FeedbackPaths, batch_id: str) -> list[Path]:
    """The landing-folder file(s) of ``batch_id`` (two when both a .csv and a .parquet exist)."""
    return [b.path for b in scan_incoming(fp)[0] if b.batch_id == batch_id]  # (no re-warning)


class BatchLimitError(BatchReadError):
    """A batch over ``feedback.max_batch_bytes`` / ``feedback.max_batch_rows``."""


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of ``path`` if it is a regular file (never through a symlink: ``O_NOFOLLOW``;
    a fifo is not waited on: ``O_NONBLOCK``) of at most ``max_bytes`` bytes. The checks use the
    opened descriptor, so swapping the file for a link after listing does not help.
    Raises :class:`BatchReadError` / :class:`BatchLimitError`."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise BatchReadError(f"{path}: cannot be opened as a regular file (symlinks are not "
                             f"followed): {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise BatchReadError(f"{path}: not a regular file; it is not read")
        if st.st_size > max_bytes:
            raise BatchLimitError(f"{path}: {st.st_size:,} bytes is over the per-batch limit "
                                  f"feedback.max_batch_bytes = {max_bytes:,}; split the batch")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while being read
        raise BatchLimitError(f"{path}: over the per-batch limit feedback.max_batch_bytes = "
                              f"{max_bytes:,}; split the batch")
    return data


def read_batch(path: Path, p: FeedbackParams | None = None,
               label: str | None = None) -> tuple[pd.DataFrame, dict]:
    """A batch file -> (canonical interactions, notes).

    Read once through :func:`read_regular_file` (regular files only, at most
    ``feedback.max_batch_bytes``); a parquet file's row count is taken from its footer and a
    batch over ``feedback.max_batch_rows`` is refused before it is loaded. CSV is parsed
    strictly by :func:`adapters.read_delimited` (invalid UTF-8, U+FFFD, ragged rows: refused
    naming the line and column); both are then coerced to the canonical dtypes, and a
    timestamp / rating / label that does not parse is refused with its line (CSV) or row
    (parquet). ``notes``: ``ignored_columns`` (not canonical), ``missing_columns``, ``lines``
    (the 1-based line / row of each batch row, not JSON: popped by the caller).
    Raises :class:`BatchReadError` (with the located problems) when the batch is refused.
    """
    from genre_tasks.data import adapters

    p = p or FeedbackParams()
    label = label or str(path)
    suffix = path.suffix.lower()
    data = read_regular_file(path, p.max_batch_bytes)
    try:
        if suffix == ".parquet":
            raw = _read_parquet_bytes(data, label, p.max_batch_rows)
        elif suffix == ".csv":
            raw = adapters.read_delimited(path, sep=",", quoting=csv.QUOTE_MINIMAL, data=data,
                                          key="feedback batch", max_rows=p.max_batch_rows,
                                          label=label)
        else:
            raise BatchReadError(f"{path}: unsupported batch file type (use {BATCH_SUFFIXES})")
        batch, lines = _parse_batch(raw, label)
    except BatchReadError:
        raise
    except adapters.InputError as exc:
        raise BatchReadError(str(exc)) from exc
    except StageError as exc:  # the row limit while parsing
        raise BatchLimitError(f"{exc}: over the per-batch limit feedback.max_batch_rows = "
                              f"{p.max_batch_rows:,}; split the batch") from exc
    except Exception as exc:  # noqa: BLE001 - any reader error: the file is not a table
        raise BatchReadError(f"{label}: not a readable {suffix} table: {exc}") from exc
    notes = {
        "ignored_columns": [str(c) for c in raw.columns if c not in S.INTERACTION_COLUMNS],
        "missing_columns": [c for c in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP) if c not in raw.columns],
        "lines": lines,
    }
    return batch, notes


def _read_parquet_bytes(data: bytes, label: str, max_rows: int) -> pd.DataFrame:
    import io as _io

    import pyarrow.parquet as pq

    if not data:
        return pd.DataFrame()
    pf = pq.ParquetFile(_io.BytesIO(data))
    n = pf.metadata.num_rows
    if n > max_rows:
        raise BatchLimitError(f"{label}: {n:,} rows is over the per-batch limit "
                              f"feedback.max_batch_rows = {max_rows:,}; split the batch")
    raw = pf.read().to_pandas()
    raw.index = pd.RangeIndex(1, len(raw) + 1, name=S.SOURCE_LINE)
    return raw


def _parse_batch(raw: pd.DataFrame, label: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Canonical interactions of a raw batch; a value that does not parse is refused."""
    from genre_tasks.data import adapters
    from genre_tasks.data.adapters.tabular import PARSERS

    lines = (raw.index.to_numpy(dtype=np.int64) if raw.index.name == S.SOURCE_LINE
             else np.arange(1, len(raw) + 1, dtype=np.int64))
    problems = adapters.Problems(label)
    cols = {c: raw[c] for c in S.INTERACTION_COLUMNS if c in raw.columns}
    for name, (parse, rule) in PARSERS.items():
        if name in cols and not (name == S.TIMESTAMP and cols[name].dtype == "int64"):
            parsed = parse(cols[name])
            problems.unparsed(cols[name], parsed, name, rule)
            cols[name] = parsed
    problems.raise_if_any()
    return adapters.canonical_interactions(pd.DataFrame(cols)), lines


def event_keys(df: pd.DataFrame) -> pd.MultiIndex:
    """One key per row: (user_id, item_id, timestamp, impression_id) as text (nulls as "")."""
    from genre_tasks.data.validate import EVENT_KEY

    cols = []
    for c in EVENT_KEY:
        if c in df.columns:
            cols.append(df[c].astype("string").fillna("").to_numpy(dtype=object))
        else:
            cols.append(np.full(len(df), "", dtype=object))
    return pd.MultiIndex.from_arrays(cols)


def in_store(batch: pd.DataFrame, store: pd.DataFrame) -> pd.Series:
    """Boolean per batch row: is the same event already in ``store``? (NA where a key column
    is null: the not-null rules report those rows.)"""
    hit = event_keys(batch).isin(event_keys(store)) if len(store) else np.zeros(len(batch), bool)
    out = pd.Series(pd.array(hit, dtype="boolean"), index=batch.index)
    for c in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP):
        if c in batch.columns:
            out[batch[c].isna().to_numpy()] = pd.NA
    return out


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
def check_batch(batch: pd.DataFrame, items: pd.DataFrame, store: pd.DataFrame, s: Settings,
                logical_date: dt.datetime, path: str = "batch",
                lines: np.ndarray | None = None) -> dict:
    """Validate a canonical batch; return the GX report (``report["success"]``), never raise.

    The ``interactions`` suite of :mod:`genre_tasks.data.validate` (built by its
    ``plan_interactions``, run by its ``run_suites``, reported by its ``build_report``) with two
    batch rules added to the same suite: timestamps not after ``logical_date``, events not
    already in ``store``. Unknown item ids fail the suite's "item_id exists in items" rule
    unless ``feedback.allow_new_items`` (then they are listed in ``report["batch"]``).
    """
    from genre_tasks.data import validate as V

    frame = V.normalize(batch, (S.USER_ID, S.ITEM_ID, S.IMPRESSION_ID))
    item_ids = items[S.ITEM_ID].astype("string") if S.ITEM_ID in items.columns else None
    new_items: list[str] = []
    if item_ids is not None and S.ITEM_ID in frame.columns:
        known = set(item_ids.dropna())
        new_items = sorted({i for i in frame[S.ITEM_ID].dropna() if i not in known})
        if s.feedback.allow_new_items and new_items:
            item_ids = pd.concat([item_ids, pd.Series(new_items, dtype="string")], ignore_index=True)
    plans = V.plan_interactions(frame, item_ids, s.validate)
    plan = plans[0]
    logical_ts = int(logical_date.timestamp())
    plan.add(f"timestamp is not after the run's logical date {_iso(logical_ts)} (unix {logical_ts})",
             "ExpectColumnValuesToBeBetween", columns=[S.TIMESTAMP], column=S.TIMESTAMP,
             max_value=logical_ts)
    if all(c in frame.columns for c in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP)):
        plan.frame = plan.frame.assign(**{IN_STORE: in_store(frame, store)})
    plan.add("event is not already in the interaction store (same user_id, item_id, timestamp, "
             "impression_id)", "ExpectColumnValuesToBeInSet",
             columns=[S.USER_ID, S.ITEM_ID, S.TIMESTAMP], requires=(IN_STORE,), column=IN_STORE,
             value_set=[False])
    results = V.run_suites(plans, s.validate)
    located = None
    if lines is not None and len(lines) == len(frame):
        located = pd.DataFrame({S.SOURCE_FILE: pd.Series([path] * len(frame), dtype="string"),
                                S.SOURCE_LINE: np.asarray(lines, dtype=np.int64)})
    report = V.build_report({"interactions": {"path": path, "frame": frame, "lines": located}},
                            plans, results, s.validate)
    for entry in report["tables"]["interactions"]["expectations"]:
        if entry.get("kwargs", {}).get("column") == IN_STORE:
            entry.pop("unexpected_values", None)  # True/False says nothing; samples show rows
    report["batch"] = {
        "rows": int(len(frame)),
        "logical_date": _iso(logical_ts),
        "new_item_ids": new_items[:50],
        "n_new_items": len(new_items),
        "allow_new_items": s.feedback.allow_new_items,
    }
    return report


def failure_report(path: str, rule: str, detail: str, rows: int = 0,
                   columns: Sequence[str] = ()) -> dict:
    """A report in :func:`validate.build_report`'s shape for a batch-level failure that needs
    no GX run (unreadable file, ambiguous id, id already applied with other content)."""
    return {
        "success": False, "evaluated_expectations": 1, "successful_expectations": 0,
        "tables": {"interactions": {
            "path": path, "rows": rows, "columns": list(columns), "success": False,
            "evaluated_expectations": 1, "successful_expectations": 0,
            "unsuccessful_expectations": 1, "skipped": [],
            "expectations": [{"suite": "batch", "rule": rule, "column": None,
                              "expectation": "batch_rule", "kwargs": {}, "success": False,
                              "unit": "rows", "error": detail}]}},
    }


def quarantine(fp: FeedbackPaths, batch_id: str, files: Sequence[Path], report: dict,
               message: str) -> Path:
    """Move the batch file(s) to ``quarantine/<batch_id>/`` with report.json and message.txt
    (atomically: the folder appears complete or not at all; then the files leave incoming)."""
    target = fp.quarantine / batch_id
    with io.atomic_dir(target) as tmp:
        for f in files:
            shutil.copy2(f, tmp / f.name)
        io.write_json(report, tmp / "report.json")
        (tmp / "message.txt").write_text(message.rstrip() + "\n")
    for f in files:
        f.unlink(missing_ok=True)
    (fp.validated / f"{batch_id}.json").unlink(missing_ok=True)
    log.error("batch %s QUARANTINED in %s:\n%s", batch_id, fp.rel(target), message)
    return target


def _message(report: dict, batch_id: str, where: Path, fp: FeedbackPaths) -> str:
    from genre_tasks.data.validate import format_failure

    report["failure_report"] = fp.rel(where / "report.json")
    return f"batch {batch_id} rejected\n" + format_failure(report)


def load_store(s: Settings, fp: FeedbackPaths) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(items, interactions) of the current store: base data (before ``ingest.until``) + the
    applied parts, every user (``max_users`` is a training-time view, not the store)."""
    from genre_tasks.data import adapters

    return adapters.load(s.ingest, fp.source, feedback=True, slice_users=False)


def _summary(batch_id: str, status: str, fp: FeedbackPaths, **extra: Any) -> dict:
    return {"batch_id": batch_id, "status": status, **extra}


def validate_batch(params: dict, paths: S.Paths, batch_id: str,
                   logical_date: str | dt.datetime, *, allow_new_items: bool | None = None,
                   store: tuple[pd.DataFrame, pd.DataFrame] | None = None) -> dict:
    """Validate landing-folder batch ``batch_id`` against the store as of ``logical_date``.

    Returns a small summary (an XCom): ``{batch_id, status, rows, file, message?, quarantine?}``
    with status ``valid`` (a validation record is written for apply), ``already_applied``
    (same id and content as an applied batch: apply only archives it), ``quarantined``
    (moved to quarantine with its report) or ``missing`` (no such file any more, e.g. a
    retried task after the file moved on). Bad data never raises: it is quarantined.
    ``store`` = preloaded (items, interactions) (the CLI validates several batches).
    """
    from genre_tasks.data import adapters

    s = settings(params, allow_new_items=allow_new_items)
    fp = FeedbackPaths(paths, s.feedback)
    moment = as_datetime(logical_date)
    with logs.stage("feedback-validate") as slog:
        files = batch_files(fp, batch_id)
        ledger = adapters.read_ledger(fp.source)
        if not files:
            status = "already_applied" if batch_id in ledger else "missing"
            slog.logger.warning("batch %s: no file in %s (%s)", batch_id, fp.rel(fp.incoming), status)
            return _summary(batch_id, status, fp, rows=0, file=None)
        for f in files:
            slog.read(f, f"batch {batch_id}")
        if len(files) > 1:
            names = ", ".join(f.name for f in files)
            report = failure_report(fp.rel(files[0]), "one file per batch id",
                                    f"several files share the batch id {batch_id}: {names}")
            where = fp.quarantine / batch_id
            target = quarantine(fp, batch_id, files, report, _message(report, batch_id, where, fp))
            return _summary(batch_id, "quarantined", fp, rows=0, file=names,
                            quarantine=fp.rel(target), message=report_short(report))
        path = files[0]
        rel = fp.rel(path)
        try:
            batch, notes = read_batch(path, s.feedback, label=rel)
        except BatchReadError as exc:
            rule = ("a batch is within feedback.max_batch_bytes / max_batch_rows"
                    if isinstance(exc, BatchLimitError) else
                    "the batch file is a readable table of well-formed values")
            report = failure_report(rel, rule, str(exc))
            where = fp.quarantine / batch_id
            target = quarantine(fp, batch_id, files, report, _message(report, batch_id, where, fp))
            return _summary(batch_id, "quarantined", fp, rows=0, file=path.name,
                            quarantine=fp.rel(target), message=report_short(report))
        sha1 = adapters.content_hash(batch)
        if batch_id in ledger:
            if ledger[batch_id].get("sha1") == sha1:
                slog.logger.info("batch %s: already applied with the same content (%d rows): "
                                 "nothing to do but archive it", batch_id, len(batch))
                return _summary(batch_id, "already_applied", fp, rows=int(len(batch)),
                                file=path.name)
            report = failure_report(rel, "a batch id is applied once",
                                    f"batch id {batch_id} was already applied on "
                                    f"{ledger[batch_id].get('applied_at')} with other content "
                                    f"({ledger[batch_id].get('rows')} rows); send new data "
                                    "under a new batch id", rows=len(batch),
                                    columns=list(batch.columns))
            where = fp.quarantine / batch_id
            target = quarantine(fp, batch_id, files, report, _message(report, batch_id, where, fp))
            return _summary(batch_id, "quarantined", fp, rows=int(len(batch)), file=path.name,
                            quarantine=fp.rel(target), message=report_short(report))

        items, inter = store if store is not None else load_store(s, fp)
        slog.read(fp.source, f"store: {len(items)} items, {len(inter)} interactions")
        report = check_batch(batch, items, inter, s, moment, rel, lines=notes.pop("lines"))
        report["batch"].update({"batch_id": batch_id, "file": path.name, "sha1": sha1, **notes,
                                **_time_range(batch)})
        if not report["success"]:
            where = fp.quarantine / batch_id
            target = quarantine(fp, batch_id, files, report, _message(report, batch_id, where, fp))
            return _summary(batch_id, "quarantined", fp, rows=int(len(batch)), file=path.name,
                            quarantine=fp.rel(target), message=report_short(report))
        record = {"batch_id": batch_id, "file": path.name, "sha1": sha1, "success": True,
                  "validated_at": _iso(int(moment.timestamp())), "report": report}
        io.write_json(record, fp.validated / f"{batch_id}.json")
        slog.wrote(fp.validated / f"{batch_id}.json", "validation record")
        if notes["ignored_columns"]:
            slog.logger.warning("batch %s: non-canonical column(s) %s are not stored", batch_id,
                                notes["ignored_columns"])
        t = report["tables"]["interactions"]
        slog.logger.info("batch %s VALID: %d rows, %d/%d expectations passed", batch_id, len(batch),
                         t["successful_expectations"], t["evaluated_expectations"])
        return _summary(batch_id, "valid", fp, rows=int(len(batch)), file=path.name,
                        new_items=report["batch"]["n_new_items"])


def report_short(report: dict, limit: int = 400) -> str:
    """One line per broken rule (for XComs and summaries), at most ``limit`` characters."""
    broken = [e for t in report["tables"].values() for e in t["expectations"] if not e["success"]]
    parts = []
    for e in broken:
        what = e["rule"]
        if "unexpected_count" in e:
            what += f" ({e['unexpected_count']} rows)"
        elif e.get("error"):
            what += f" ({e['error']})"
        parts.append(what)
    text = "; ".join(parts)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _time_range(batch: pd.DataFrame) -> dict:
    ts = batch[S.TIMESTAMP].dropna() if S.TIMESTAMP in batch.columns else pd.Series([], dtype="int64")
    if not len(ts):
        return {"min_timestamp": None, "max_timestamp": None}
    return {"min_timestamp": int(ts.min()), "max_timestamp": int(ts.max()),
            "first": _iso(int(ts.min())), "last": _iso(int(ts.max()))}


# --------------------------------------------------------------------------------------
# apply (the store)
# --------------------------------------------------------------------------------------
def _write_ledger(fp: FeedbackPaths, ledger: dict[str, dict]) -> None:
    from genre_tasks.data import adapters

    io.write_json({"version": 1, "batches": ledger}, adapters.ledger_path(fp.source))


def archive(fp: FeedbackPaths, batch_id: str, path: Path, record: dict | None) -> Path:
    """Move an applied batch's file to ``applied/<batch_id>/`` with its validation report."""
    target = fp.applied / batch_id
    old_report = target / "report.json"
    with io.atomic_dir(target) as tmp:
        shutil.copy2(path, tmp / path.name)
        if record is not None:
            io.write_json(record.get("report", record), tmp / "report.json")
        elif old_report.exists():  # a re-delivered batch: keep the report of its first apply
            shutil.copy2(old_report, tmp / "report.json")
    path.unlink(missing_ok=True)
    (fp.validated / f"{batch_id}.json").unlink(missing_ok=True)
    return target


def apply_batch(params: dict, paths: S.Paths, batch_id: str,
                logical_date: str | dt.datetime) -> dict:
    """Append validated batch ``batch_id`` to the store, exactly once (see :func:`_apply_locked`).

    The store lock is taken BEFORE the store is read: the "already in the store" check always
    sees every batch another process applied (two runs at once used to apply the same events
    twice, each checking a copy of the store read before the other's apply).
    """
    s = settings(params)
    fp = FeedbackPaths(paths, s.feedback)
    with logs.stage("feedback-apply") as slog, store_lock(fp):
        store = load_store(s, fp)[1]
        return _apply_locked(s, fp, batch_id, as_datetime(logical_date), store, slog)


def _apply_locked(s: Settings, fp: FeedbackPaths, batch_id: str, moment: dt.datetime,
                  store: pd.DataFrame, slog: logs.StageLog) -> dict:
    """Apply one batch; the caller holds :func:`store_lock` and read ``store`` under it.

    1. the batch must carry a validation record of the same content (else StageError);
    2. its events are checked again against the store as it is now (a batch applied earlier in
       the same run, or by another process, may hold the same events): duplicates quarantine it;
    3. the part ``data/source/feedback/<batch_id>.parquet`` is written atomically, unless an
       identical part is already there (an interrupted earlier apply);
    4. the ledger entry is written (atomically) - the commit point;
    5. the file is archived in ``applied/<batch_id>/``.

    Returns ``{batch_id, status: applied | already_applied | quarantined, rows, ...}``.
    """
    from genre_tasks.data import adapters
    from genre_tasks.data.ingest import write_table

    files = batch_files(fp, batch_id)
    ledger = adapters.read_ledger(fp.source)
    if not files:
        if batch_id in ledger:
            return _summary(batch_id, "already_applied", fp, rows=int(ledger[batch_id]["rows"]))
        raise StageError(f"batch {batch_id}: no file in {fp.rel(fp.incoming)} and not in the "
                         "store ledger")
    path = files[0]
    batch, _ = read_batch(path, s.feedback)
    sha1 = adapters.content_hash(batch)
    record_path = fp.validated / f"{batch_id}.json"
    record = io.read_json(record_path) if record_path.exists() else None
    if batch_id in ledger:
        if ledger[batch_id].get("sha1") == sha1:
            archive(fp, batch_id, path, record)
            slog.logger.info("batch %s: already in the store; archived the file", batch_id)
            return _summary(batch_id, "already_applied", fp, rows=int(len(batch)))
        raise StageError(f"batch {batch_id}: id already applied with other content (validate "
                         "quarantines such a batch; was the file replaced after validation?)")
    if not record or not record.get("success") or record.get("sha1") != sha1:
        raise StageError(f"batch {batch_id}: {fp.rel(path)} has no validation record of this "
                         f"content in {fp.rel(fp.validated)}; validate it first")

    dups = in_store(batch, store).fillna(False).to_numpy(dtype=bool)
    if dups.any():
        from genre_tasks.data.validate import add_failure

        report = add_failure(record["report"], "event is not already in the interaction store "
                             "(checked again at apply time)",
                             f"{int(dups.sum())} of {len(batch)} events were added to the store "
                             "after this batch was validated (by another batch)")
        where = fp.quarantine / batch_id
        target = quarantine(fp, batch_id, [path], report, _message(report, batch_id, where, fp))
        return _summary(batch_id, "quarantined", fp, rows=int(len(batch)),
                        quarantine=fp.rel(target), message=report_short(report))

    part = adapters.part_path(fp.source, batch_id)
    if part.exists() and adapters.content_hash(adapters.read_part(part)) == sha1:
        slog.logger.warning("batch %s: the identical part %s of an interrupted apply is already "
                            "in place: reusing it", batch_id, fp.rel(part))
    else:
        write_table(batch, part)
        slog.wrote(part, f"store part, {len(batch)} rows")
    entry = {"rows": int(len(batch)), "sha1": sha1, "file": path.name,
             "users": int(batch[S.USER_ID].nunique()),
             "applied_at": _iso(int(moment.timestamp())),
             "part": fp.rel(part), **_time_range(batch)}
    _write_ledger(fp, {**ledger, batch_id: entry})
    slog.wrote(adapters.ledger_path(fp.source), f"ledger: + {batch_id}")
    archive(fp, batch_id, path, record)
    slog.logger.info("batch %s APPLIED: %d rows (store: %d batches)", batch_id, len(batch),
                     len(ledger) + 1)
    return _summary(batch_id, "applied", fp, rows=int(len(batch)), part=fp.rel(part))


def apply_batches(params: dict, paths: S.Paths, batch_ids: Sequence[str],
                  logical_date: str | dt.datetime) -> dict:
    """Apply ``batch_ids`` in batch-id order under ONE hold of the store lock, the store read
    after the lock is taken; return ``{"batches": [...summaries], "applied": [ids newly
    applied], "unrecorded": [ledger ids DVC has not recorded yet]}``."""
    from genre_tasks.data import adapters

    s = settings(params)
    fp = FeedbackPaths(paths, s.feedback)
    moment = as_datetime(logical_date)
    results = []
    if batch_ids:
        with logs.stage("feedback-apply") as slog, store_lock(fp):
            store = load_store(s, fp)[1]
            for batch_id in sorted(set(batch_ids)):
                res = _apply_locked(s, fp, batch_id, moment, store, slog)
                results.append(res)
                if res["status"] == "applied":
                    part = adapters.read_part(adapters.part_path(fp.source, batch_id))
                    store = adapters.append_interactions(store, part)
    return {"batches": results, "applied": [r["batch_id"] for r in results if r["status"] == "applied"],
            "unrecorded": unrecorded(fp)}


# --------------------------------------------------------------------------------------
# prequential evaluation
# --------------------------------------------------------------------------------------
def score_batch(rec: Any, catalog: Any, store: pd.DataFrame, batch: pd.DataFrame,
                positive_threshold: float = 4.0, seed: int = 42) -> dict:
    """Score ``rec`` (a data.Recommender) on ``batch`` given the ``store`` it follows.

    ``catalog`` is a user-free :class:`data.FitData` of the model's item catalogue (what the
    served model carries: item ids, vectors, genres, popularity). Users of the batch get their
    store interactions as fit data: positives in time order as histories, every store item as
    seen (excluded from the ranking). Protocol (global_temporal, full ranking): a user is
    evaluated when they have a positive history and >= 1 positive in the batch on a catalogue
    item they have not seen; targets = those items. Impressions: per user with a history, the
    batch items they rated (AUC needs >= 1 positive and >= 1 negative).

    Returns ``{"metrics": {ndcg@10, recall@10, recall@20, mrr, hr@10, auc, ..., <m>_se,
    n_users, n_impressions}, "counts": {batch_rows, batch_users, batch_positives, known_users,
    new_users, users_with_history, eval_users, impressions, unknown_item_rows}}``.
    """
    from scipy import sparse

    from genre_tasks.models import views as D
    from genre_tasks.evaluation import protocol as evaluation
    from genre_tasks.data.preprocess import positive_labels

    index = pd.Series(np.arange(catalog.n_items, dtype=np.int64),
                      index=pd.Index(np.asarray(catalog.item_ids).astype(str)))
    users = sorted(batch[S.USER_ID].dropna().astype(str).unique())
    uidx = pd.Series(np.arange(len(users), dtype=np.int64), index=pd.Index(users, dtype=object))
    n_users = len(users)

    def frame(df: pd.DataFrame) -> pd.DataFrame:
        out = df[df[S.USER_ID].astype(str).isin(uidx.index)].copy()
        out["_order"] = np.arange(len(out))
        out[S.USER_IDX] = uidx.reindex(out[S.USER_ID].astype(str)).to_numpy()
        out[S.ITEM_IDX] = index.reindex(out[S.ITEM_ID].astype(str)).to_numpy()
        out[S.POSITIVE] = positive_labels(out, positive_threshold).to_numpy()
        return out

    hist_rows = frame(store)
    known_users = int(hist_rows[S.USER_IDX].nunique()) if len(hist_rows) else 0
    hist_rows = hist_rows[hist_rows[S.ITEM_IDX].notna()]
    hist_rows = hist_rows.sort_values([S.TIMESTAMP, "_order"], kind="stable")
    hist_rows[S.ITEM_IDX] = hist_rows[S.ITEM_IDX].astype(np.int64)
    pos = hist_rows[hist_rows[S.POSITIVE]]
    shape = (n_users, catalog.n_items)
    seen = sparse.csr_matrix((np.ones(len(hist_rows), bool), (hist_rows[S.USER_IDX].to_numpy(np.int64),
                              hist_rows[S.ITEM_IDX].to_numpy(np.int64))), shape=shape)
    positives = sparse.csr_matrix((np.ones(len(pos), np.float32), (pos[S.USER_IDX].to_numpy(np.int64),
                                   pos[S.ITEM_IDX].to_numpy(np.int64))), shape=shape)
    positives.data[:] = 1.0
    by_user = pos.groupby(S.USER_IDX, sort=True)[S.ITEM_IDX].agg(lambda s: s.to_numpy(np.int64))
    histories = [np.asarray(by_user.get(u, np.empty(0, np.int64)), dtype=np.int64)
                 for u in range(n_users)]
    fit = dataclasses.replace(catalog, phase="test", n_users=n_users,
                              user_ids=np.asarray(users, dtype=object), rows=hist_rows,
                              positives=positives, seen=seen, histories=histories)

    rows = frame(batch)
    unknown_items = int(rows[S.ITEM_IDX].isna().sum())
    rows = rows[rows[S.ITEM_IDX].notna()].copy()
    rows[S.ITEM_IDX] = rows[S.ITEM_IDX].astype(np.int64)
    has_hist = np.array([len(h) > 0 for h in histories], dtype=bool)
    seen_lil = seen.tolil()
    eval_users, targets, impressions = [], [], []
    for u, g in rows.groupby(S.USER_IDX, sort=True):
        u = int(u)
        if not has_hist[u]:
            continue
        seen_u = set(seen_lil.rows[u])
        tgt = np.unique(g.loc[g[S.POSITIVE], S.ITEM_IDX].to_numpy(np.int64))
        tgt = np.asarray([i for i in tgt if i not in seen_u], dtype=np.int64)
        if len(tgt):
            eval_users.append(u)
            targets.append(tgt)
        imp = g.drop_duplicates(S.ITEM_IDX, keep="last")
        labels = imp[S.POSITIVE].to_numpy().astype(np.int8)
        if 0 < labels.sum() < len(labels):
            impressions.append((u, imp[S.ITEM_IDX].to_numpy(np.int64), labels))
    ev = D.EvalData(phase="test", users=np.asarray(eval_users, dtype=np.int64), targets=targets,
                    impressions=impressions)
    counts = {
        "batch_rows": int(len(batch)),
        "batch_users": n_users,
        "batch_positives": int(positive_labels(batch, positive_threshold).sum()),
        "known_users": known_users,
        "new_users": n_users - known_users,
        "users_with_history": int(has_hist.sum()),
        "eval_users": len(eval_users),
        "impressions": len(impressions),
        "unknown_item_rows": unknown_items,
    }
    if not eval_users and not impressions:
        return {"metrics": {"n_users": 0, "n_impressions": 0}, "counts": counts}
    res = evaluation.evaluate_recommender(rec, fit, ev, seed)
    metrics = {k: (float(v) if v is not None and np.isfinite(v) else None)
               for k, v in res.metrics.items()}
    return {"metrics": metrics, "counts": counts}


def load_champion(paths: S.Paths, model_name: str) -> tuple[Any, str | None, str]:
    """``(model, version, reason)``: the ``@champion`` as a serving.GenreRecommenderModel, or
    ``(None, None, why not)`` when there is no registry / registered model / champion yet."""
    from genre_tasks.registry import tracking

    uri = tracking.tracking_uri(paths)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return None, None, f"no MLflow database at {uri} yet"
    from mlflow.exceptions import MlflowException

    tracking.set_uris(paths)
    cl = tracking.client(paths)
    try:
        mv = cl.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None, None, f"no {model_name}@{CHAMPION} in the registry yet"
    from genre_tasks.registry import serving

    model = serving.load(f"models:/{model_name}/{mv.version}", cl)
    return model, str(mv.version), ""


def log_prequential(paths: S.Paths, record: dict) -> str:
    """Log a prequential record to MLflow (one run per batch x model version; an existing
    finished run of the same batch content and version is reused). Returns the run id."""
    from genre_tasks.registry import tracking

    exp_id = tracking.configure(paths)
    cl = tracking.client(paths)
    tags = {TAG_PREQUENTIAL: "1", TAG_BATCH: record["batch_id"], TAG_MODEL: record["model_name"],
            TAG_VERSION: record["model_version"], TAG_SHA1: record.get("sha1") or "",
            "genre.logical_date": record.get("logical_date") or ""}
    found = cl.search_runs(
        [exp_id], max_results=1,
        filter_string=" and ".join(f"tags.`{k}` = '{tags[k]}'"
                                   for k in (TAG_PREQUENTIAL, TAG_BATCH, TAG_VERSION, TAG_SHA1)))
    if found and found[0].info.status == "FINISHED":
        return found[0].info.run_id
    run_id = (found[0].info.run_id if found else cl.create_run(
        exp_id, run_name=f"prequential-{record['batch_id']}-v{record['model_version']}",
        tags={**tags, "mlflow.note.content":
              f"@champion v{record['model_version']} scored on feedback batch "
              f"{record['batch_id']} before training on it"}).info.run_id)
    tracking.log_metrics(run_id, record["metrics"], paths)
    tracking.log_metrics(run_id, record["counts"], paths, prefix="count.")
    cl.log_dict(run_id, record, "prequential.json")
    cl.set_terminated(run_id)
    return run_id


def prequential(params: dict, paths: S.Paths, batch_ids: Sequence[str],
                logical_date: str | dt.datetime, *, enabled: bool | None = None,
                model: Any = None, version: str | None = None) -> dict[str, dict]:
    """Score the ``@champion`` on each batch (in batch-id order) before it is applied.

    Batch b is scored with the store as it will be when b is applied: the current store plus
    the batches before it in this call. Writes ``prequential/<batch_id>.json`` and an MLflow
    run per batch. Returns ``{batch_id: {status, model_version?, ndcg@10, ..., eval_users}}``
    (status ``scored`` | ``reused`` | ``skipped``). ``model``/``version`` replace the champion
    (tests). An existing record of the same content and champion version is reused.
    """
    from genre_tasks.data import adapters

    s = settings(params, prequential=enabled)
    fp = FeedbackPaths(paths, s.feedback)
    ids = sorted(set(batch_ids))
    if not ids:
        return {}
    if not s.feedback.prequential:
        return {b: {"status": "skipped", "reason": "feedback.prequential is off"} for b in ids}
    moment = as_datetime(logical_date)
    out: dict[str, dict] = {}
    with logs.stage("feedback-prequential") as slog:
        reason = ""
        if model is None:
            model, version, reason = load_champion(paths, s.model_name)
        if model is None:
            slog.logger.warning("prequential scoring skipped: %s", reason)
            return {b: {"status": "skipped", "reason": reason} for b in ids}
        slog.logger.info("scoring %s@%s (v%s) on %d batch(es)", s.model_name, CHAMPION, version, len(ids))
        store = load_store(s, fp)[1]
        for batch_id in ids:
            files = batch_files(fp, batch_id)
            if not files:
                out[batch_id] = {"status": "skipped", "reason": "no batch file"}
                continue
            batch, _ = read_batch(files[0], s.feedback)
            sha1 = adapters.content_hash(batch)
            target = fp.prequential / f"{batch_id}.json"
            old = io.read_json(target) if target.exists() else None
            if old and old.get("sha1") == sha1 and old.get("model_version") == version:
                out[batch_id] = {"status": "reused", **_small_prequential(old)}
            else:
                result = score_batch(model.recommender, model.fit, store, batch,
                                     s.positive_threshold, s.seed)
                record = {"batch_id": batch_id, "sha1": sha1, "model_name": s.model_name,
                          "model_version": version, "logical_date": _iso(int(moment.timestamp())),
                          "store_rows_before": int(len(store)), **_time_range(batch), **result}
                try:
                    record["mlflow_run_id"] = log_prequential(paths, record)
                except Exception as exc:  # noqa: BLE001 - the local record still counts
                    slog.logger.warning("prequential record of %s not logged to MLflow: %s",
                                        batch_id, exc)
                io.write_json(record, target)
                slog.wrote(target, f"prequential metrics of v{version}")
                out[batch_id] = {"status": "scored", **_small_prequential(record)}
            m = out[batch_id]
            slog.logger.info("batch %s: v%s nDCG@10=%s Recall@10=%s MRR=%s AUC=%s (%s users, %s "
                             "impressions)", batch_id, version, *(_fmt(m.get(k)) for k in PREQUENTIAL_METRICS),
                             m.get("eval_users"), m.get("impressions"))
            store = adapters.append_interactions(store, batch)
    return out


def _small_prequential(record: dict) -> dict:
    m, c = record.get("metrics", {}), record.get("counts", {})
    return {"model_version": record.get("model_version"),
            **{k: m.get(k) for k in PREQUENTIAL_METRICS},
            "eval_users": c.get("eval_users"), "impressions": c.get("impressions"),
            "batch_users": c.get("batch_users"), "new_users": c.get("new_users")}


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


# --------------------------------------------------------------------------------------
# DVC record
# --------------------------------------------------------------------------------------
def unrecorded(fp: FeedbackPaths) -> list[str]:
    """Applied batch ids whose store version has not been recorded (DVC) yet."""
    from genre_tasks.data import adapters

    done = set(io.read_json(fp.recorded).get("batches", [])) if fp.recorded.exists() else set()
    return sorted(set(adapters.read_ledger(fp.source)) - done)


def _dvc(root: Path, *args: str, timeout: int = 600) -> str:
    cmd = [sys.executable, "-m", "dvc", *args]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout, env=env)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        # not a StageError: a locked repo or an unreachable remote is worth retrying
        raise RuntimeError(f"`dvc {' '.join(args)}` failed ({proc.returncode}) in {root}:\n{out[-3000:]}")
    return out


def _lock_md5(root: Path, stage: str, out_path: str) -> str | None:
    import yaml

    lock = root / "dvc.lock"
    if not lock.exists():
        return None
    doc = yaml.safe_load(lock.read_text()) or {}
    for o in ((doc.get("stages") or {}).get(stage) or {}).get("outs") or []:
        if str(o.get("path")) == out_path:
            return o.get("md5")
    return None


def _source_stage(root: Path, out_path: str) -> str | None:
    """Name of the dvc.yaml stage whose output is ``out_path`` (normally ``source``)."""
    import yaml

    f = root / "dvc.yaml"
    if not f.exists():
        return None
    doc = yaml.safe_load(f.read_text()) or {}
    for name, stage in (doc.get("stages") or {}).items():
        for o in stage.get("outs") or []:
            path = next(iter(o)) if isinstance(o, dict) else o
            if str(path).rstrip("/") == out_path:
                return name
    return None


def dvc_record(root: Path, source: Path, push: bool = True) -> dict:
    """Record the current ``data/source`` with DVC: ``dvc commit --force <stage>`` (creates the
    dvc.lock entry when there is none yet) and ``dvc push <stage>`` to the default remote.

    Returns ``{"dvc": "committed" | "pushed" | "skipped: <why>", "source_md5": ...}``.
    Not a DVC repository / no stage producing data/source: skipped with a warning.
    """
    root = Path(root).resolve()
    if not (root / ".dvc").is_dir():
        log.warning("%s is not a DVC repository (no .dvc/): the store's new version is not "
                    "recorded (run `dvc init` to version data/source)", root)
        return {"dvc": "skipped: not a DVC repository", "source_md5": None}
    out_path = _rel(source, root)
    stage = _source_stage(root, out_path)
    if stage is None:
        log.warning("no stage in %s/dvc.yaml outputs %s: the store is not recorded", root, out_path)
        return {"dvc": f"skipped: no dvc.yaml stage outputs {out_path}", "source_md5": None}
    had_lock = _lock_md5(root, stage, out_path) is not None
    out = _dvc(root, "commit", "--force", stage)
    md5 = _lock_md5(root, stage, out_path)
    log.info("dvc commit %s: %s -> %s md5 %s%s", stage, out or "ok", out_path, md5,
             "" if had_lock else " (new dvc.lock entry)")
    result = {"dvc": "committed", "source_md5": md5, "stage": stage}
    if push:
        out = _dvc(root, "push", stage)
        log.info("dvc push %s: %s", stage, out.splitlines()[-1] if out else "ok")
        result["dvc"] = "pushed"
    log.info("dvc.lock now records %s = %s; commit dvc.lock with git to version it", out_path, md5)
    return result


def record_store(params: dict, paths: S.Paths, *, dvc: bool | None = None,
                 push: bool | None = None) -> dict:
    """Record the store's new version (DVC) if batches were applied since the last record.

    Returns ``{"status": "recorded" | "up_to_date", "batches": [ids], "rows": n, "dvc": ...,
    "source_md5": ...}``; ``recorded.json`` lists the batches whose version is recorded.
    DVC errors raise RuntimeError (retry); the batches then stay unrecorded.
    """
    from genre_tasks.data import adapters

    s = settings(params, dvc=dvc, dvc_push=push)
    fp = FeedbackPaths(paths, s.feedback)
    with logs.stage("feedback-record") as slog, store_lock(fp):
        pending = unrecorded(fp)
        if not pending:
            slog.logger.info("store unchanged since the last record: nothing to do")
            return {"status": "up_to_date", "batches": [], "rows": 0}
        ledger = adapters.read_ledger(fp.source)
        rows = sum(int(ledger[b]["rows"]) for b in pending)
        if s.feedback.dvc:
            result = dvc_record(paths.root, fp.source, push=s.feedback.dvc_push)
        else:
            result = {"dvc": "skipped: feedback.dvc is off", "source_md5": None}
        io.write_json({"batches": sorted(ledger), "source_md5": result.get("source_md5"),
                       "dvc": result["dvc"]}, fp.recorded)
        slog.wrote(fp.recorded, f"{len(pending)} batch(es) recorded ({result['dvc']})")
        return {"status": "recorded", "batches": pending, "rows": rows,
                "store_batches": len(ledger), **result}


# --------------------------------------------------------------------------------------
# the whole loop (CLI) and status
# --------------------------------------------------------------------------------------
def run(params: dict, paths: S.Paths, logical_date: str | dt.datetime, *,
        prequential_scoring: bool | None = None, dvc: bool | None = None,
        push: bool | None = None, allow_new_items: bool | None = None) -> dict:
    """Process every batch in the landing folder: validate, score, apply, record.

    What the Airflow DAG ``genre_feedback`` does task by task, in one call (``genre feedback
    run``). Returns ``{"batches": {id: status}, "quarantined": [...], "applied": [...],
    "prequential": {...}, "record": {...}, "refused": {entry: reason}, "not_processed":
    {file: reason}}``: every entry of the landing folder is either processed or reported
    (symlinks, fifos, devices and folders are refused and moved to quarantine unread; hidden
    files and other file types are reported and left in place).
    """
    s = settings(params, allow_new_items=allow_new_items)
    fp = FeedbackPaths(paths, s.feedback)
    refused = refuse_entries(fp)
    batches, others = scan_incoming(fp)
    not_processed = {o["name"]: o["reason"] for o in others if not o["refuse"]}
    for name, reason in not_processed.items():
        log.warning("%s: %s", fp.rel(fp.incoming / name), reason)
    ids = sorted({b.batch_id for b in batches})
    if not ids:
        log.info("no batch file in %s%s", fp.rel(fp.incoming),
                 f"; {len(refused) + len(not_processed)} other entr(ies) reported above"
                 if refused or not_processed else "")
    store = load_store(s, fp) if ids else None
    validated = [validate_batch(params, paths, b, logical_date, allow_new_items=allow_new_items,
                                store=store) for b in ids]
    good = [v["batch_id"] for v in validated if v["status"] == "valid"]
    again = [v["batch_id"] for v in validated if v["status"] == "already_applied"]
    scores = prequential(params, paths, good, logical_date, enabled=prequential_scoring)
    applied = apply_batches(params, paths, good + again, logical_date) if good or again else {
        "batches": [], "applied": [], "unrecorded": unrecorded(fp)}
    record = (record_store(params, paths, dvc=dvc, push=push) if applied["unrecorded"]
              else {"status": "up_to_date", "batches": []})
    status = {v["batch_id"]: v["status"] for v in validated}
    status.update({a["batch_id"]: a["status"] for a in applied["batches"]})
    return {"batches": status,
            "quarantined": sorted(b for b, st in status.items() if st == "quarantined"),
            "applied": applied["applied"], "prequential": scores, "record": record,
            "messages": {v["batch_id"]: v["message"] for v in validated if v.get("message")},
            "refused": refused, "not_processed": not_processed}


def status(params: dict, paths: S.Paths) -> dict:
    """The loop's state: landing folder, quarantine, store (base + parts), DVC record."""
    from genre_tasks.data import adapters

    s = settings(params)
    fp = FeedbackPaths(paths, s.feedback)
    ledger = adapters.read_ledger(fp.source)
    quarantined = sorted(p.name for p in fp.quarantine.iterdir()) if fp.quarantine.is_dir() else []
    recorded = io.read_json(fp.recorded) if fp.recorded.exists() else {}
    out = {
        "incoming": [b.path.name for b in list_batches(fp)],
        "quarantined": quarantined,
        "store_batches": sorted(ledger),
        "store_feedback_rows": sum(int(e.get("rows", 0)) for e in ledger.values()),
        "unrecorded": unrecorded(fp),
        "recorded_source_md5": recorded.get("source_md5"),
        "prequential": sorted(p.stem for p in fp.prequential.glob("*.json")) if fp.prequential.is_dir() else [],
    }
    try:
        items, base = adapters.load(s.ingest, fp.source, feedback=False, slice_users=False)
        out["store_base_rows"] = int(len(base))
        out["store_rows"] = out["store_base_rows"] + out["store_feedback_rows"]
        out["items"] = int(len(items))
    except StageError as exc:
        out["store_base_rows"] = None
        out["error"] = str(exc)
    return out


# --------------------------------------------------------------------------------------
# CLI: genre feedback ...
# --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genre feedback", description="Feedback loop: new interaction batches -> store.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--root", default=".")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="validate, score, apply and record every batch in the landing folder")
    r.add_argument("--logical-date", default=None,
                   help="ISO date-time the batches are validated against (default: now, UTC)")
    r.add_argument("--no-prequential", action="store_true", help="do not score the champion")
    r.add_argument("--no-dvc", action="store_true", help="do not record the store with DVC")
    r.add_argument("--no-push", action="store_true", help="dvc commit but do not push")
    r.add_argument("--allow-new-items", action="store_true", default=None,
                   help="accept item ids unknown to the items table")
    sub.add_parser("status", help="landing folder, quarantine, store and DVC record")
    rec = sub.add_parser("record", help="record the store's version with DVC (commit + push)")
    rec.add_argument("--no-push", action="store_true")
    rp = sub.add_parser("replay", help="replay MovieLens' real future interactions as weekly batches")
    mode = rp.add_mutually_exclusive_group(required=True)
    mode.add_argument("--init", action="store_true",
                      help="cut the data after the cutoff into weekly pending batches")
    mode.add_argument("--next", action="store_true", help="release the next pending batch")
    mode.add_argument("--status", action="store_true", help="pending / released batches")
    rp.add_argument("--cutoff", default=None,
                    help="ISO date: the initial store holds the interactions before it "
                         "(default: ingest.until); must equal ingest.until")
    rp.add_argument("--reset", action="store_true",
                    help="with --init: delete the replay state, the feedback folders and the "
                         "store parts first")
    rp.add_argument("--corrupt", action="store_true",
                    help="with --next: release a deliberately corrupted copy of the next batch "
                         "(rating 11, unknown item, future timestamp, duplicates) instead")
    return parser


def feedback_cli(argv: list[str] | None = None) -> int:
    """``genre feedback [--root R] [--params P] [--override O] <run|status|record|replay> ...``.

    Prints a JSON summary; exit code 0, 1 (a stage refused: message on stderr) or 2 (params).
    """
    from genre_tasks.feedback import replay
    from genre_tasks.cli import exit_code

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "replay" and (args.reset and not args.init or args.corrupt and not args.next):
        parser.error("replay: --reset goes with --init, --corrupt with --next")
    logs.setup_logging()
    paths = S.Paths(args.root)

    def body() -> dict:
        params = config.load_params(args.params, args.override)
        if args.command == "run":
            moment = (as_datetime(args.logical_date) if args.logical_date
                      else dt.datetime.now(dt.timezone.utc))  # the CLI boundary: now is the run's date
            out = run(params, paths, moment, prequential_scoring=False if args.no_prequential else None,
                      dvc=False if args.no_dvc else None, push=False if args.no_push else None,
                      allow_new_items=args.allow_new_items)
            for batch_id, msg in out.get("messages", {}).items():
                print(f"batch {batch_id} quarantined: {msg}", file=sys.stderr)
            for name, msg in {**out.get("refused", {}), **out.get("not_processed", {})}.items():
                print(f"{name}: {msg}", file=sys.stderr)
        elif args.command == "status":
            out = status(params, paths)
        elif args.command == "record":
            out = record_store(params, paths, push=False if args.no_push else None)
        else:
            if args.init:
                out = replay.init(params, paths, cutoff=args.cutoff, reset=args.reset)
            elif args.next:
                out = replay.next_batch(params, paths, corrupt=args.corrupt)
            else:
                out = replay.replay_status(params, paths)
        return out

    return exit_code(f"feedback {args.command}", body)


__all__ = [
    "FeedbackParams", "FeedbackPaths", "Settings", "settings", "Batch", "list_batches",
    "read_batch", "check_batch", "validate_batch", "quarantine", "apply_batch", "apply_batches",
    "score_batch", "load_champion", "prequential", "record_store", "dvc_record", "unrecorded",
    "run", "status", "feedback_cli",
]
