"""Apply good batches to the interaction store: the store lock, one atomic part per batch, then
the ledger entry (the commit point), then the archive."""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd

from genre_tasks import io, logs
from genre_tasks import schema as S
from genre_tasks.errors import StageError
from genre_tasks.feedback.params import FeedbackPaths, Settings, _iso, as_datetime, settings
from genre_tasks.feedback.batches import (
    _message,
    _summary,
    _time_range,
    batch_files,
    in_store,
    load_store,
    quarantine,
    read_batch,
    report_short,
)


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
        from genre_tasks.data.gx_report import add_failure

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


def unrecorded(fp: FeedbackPaths) -> list[str]:
    """Applied batch ids whose store version has not been recorded (DVC) yet."""
    from genre_tasks.data import adapters

    done = set(io.read_json(fp.recorded).get("batches", [])) if fp.recorded.exists() else set()
    return sorted(set(adapters.read_ledger(fp.source)) - done)
