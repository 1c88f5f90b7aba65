"""The whole loop in one call (:func:`run`, what ``genre feedback run`` and the DAG do task by
task) and the loop's :func:`status`."""
from __future__ import annotations

import datetime as dt
import logging

from genre_tasks import io
from genre_tasks import schema as S
from genre_tasks.errors import StageError
from genre_tasks.feedback.params import FeedbackPaths, settings
from genre_tasks.feedback.batches import (
    list_batches,
    load_store,
    refuse_entries,
    scan_incoming,
    validate_batch,
)
from genre_tasks.feedback.apply import apply_batches
from genre_tasks.feedback.scoring import prequential
from genre_tasks.feedback.apply import unrecorded
from genre_tasks.feedback.record import record_store

log = logging.getLogger("genre.feedback")


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
