"""Batches in the landing folder: list, read (bounded, regular files only), check against the
suite and the store, quarantine; :func:`validate_batch` is the validation step."""
from __future__ import annotations

import csv
import datetime as dt
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from genre_tasks import io, logs
from genre_tasks import schema as S
from genre_tasks.errors import StageError
from genre_tasks.feedback.params import (
    BATCH_SUFFIXES,
    FeedbackParams,
    FeedbackPaths,
    IN_STORE,
    Settings,
    _iso,
    as_datetime,
    settings,
)

log = logging.getLogger("genre.feedback")


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
        log.warning("%s REFUSED: %s", fp.rel(src), message)
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
    from genre_tasks.data.expectations import EVENT_KEY

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

    The ``interactions`` suite of :mod:`genre_tasks.data.expectations` (built by its
    ``plan_interactions``; run by :func:`~genre_tasks.data.gx_report.run_suites`, reported by
    :func:`~genre_tasks.data.gx_report.build_report`) with two batch rules added to the same
    suite: timestamps not after ``logical_date``, events not already in ``store``. Unknown item
    ids fail the suite's "item_id exists in items" rule unless ``feedback.allow_new_items``
    (then they are listed in ``report["batch"]``).
    """
    from genre_tasks.data import expectations, gx_report

    frame = expectations.normalize(batch, (S.USER_ID, S.ITEM_ID, S.IMPRESSION_ID))
    item_ids = items[S.ITEM_ID].astype("string") if S.ITEM_ID in items.columns else None
    new_items: list[str] = []
    if item_ids is not None and S.ITEM_ID in frame.columns:
        known = set(item_ids.dropna())
        new_items = sorted({i for i in frame[S.ITEM_ID].dropna() if i not in known})
        if s.feedback.allow_new_items and new_items:
            item_ids = pd.concat([item_ids, pd.Series(new_items, dtype="string")], ignore_index=True)
    plans = expectations.plan_interactions(frame, item_ids, s.validate)
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
    results = gx_report.run_suites(plans, s.validate)
    located = None
    if lines is not None and len(lines) == len(frame):
        located = pd.DataFrame({S.SOURCE_FILE: pd.Series([path] * len(frame), dtype="string"),
                                S.SOURCE_LINE: np.asarray(lines, dtype=np.int64)})
    report = gx_report.build_report(
        {"interactions": {"path": path, "frame": frame, "lines": located}}, plans, results,
        s.validate)
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
    """A report in :func:`gx_report.build_report`'s shape for a batch-level failure that needs
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
    log.warning("batch %s QUARANTINED in %s:\n%s", batch_id, fp.rel(target), message)
    return target


def _message(report: dict, batch_id: str, where: Path, fp: FeedbackPaths) -> str:
    from genre_tasks.data.gx_report import format_failure

    report["failure_report"] = fp.rel(where / "report.json")
    return f"batch {batch_id} rejected\n" + format_failure(report)


def load_store(s: Settings, fp: FeedbackPaths, exclude: Sequence[str] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(items, interactions) of the current store: base data (before ``ingest.until``) + the
    applied parts, every user (``max_users`` is a training-time view, not the store).
    ``exclude``: applied batches left out (the store as it was before them)."""
    from genre_tasks.data import adapters

    return adapters.load(s.ingest, fp.source, feedback=True, slice_users=False, exclude=exclude)


def archived_files(fp: FeedbackPaths, batch_id: str) -> list[Path]:
    """The file(s) of applied batch ``batch_id`` as :func:`apply.archive` kept them
    (``applied/<batch_id>/``, beside its report.json)."""
    folder = fp.applied / batch_id
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in BATCH_SUFFIXES and p.stem == batch_id)


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
