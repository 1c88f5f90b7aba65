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
   :mod:`genre_tasks.data.expectations` (the same rules as the main data: required columns, dtypes,
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
``evaluate.seed``. ``genre feedback ...`` is :mod:`genre_tasks.feedback.cli`.

Modules, one job each (imports point down this list; none imports the package itself):

    params     FeedbackParams, Settings, FeedbackPaths, constants
    batches    list / read / check / quarantine a batch; validate_batch
    apply      the store lock, apply_batch(es) (part, then ledger), unrecorded
    scoring    prequential scoring of the @champion
    record     dvc commit + push of the store
    loop       run (the whole loop in one call) and status
    replay     MovieLens' real future as weekly batches (demo / tests)
    history    the champion's prequential history (report)
    cli        ``genre feedback ...``

The names below are re-exported lazily (PEP 562), so ``from genre_tasks import feedback;
feedback.run(...)`` works without importing pandas until a name is used.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "params": ("FeedbackParams", "FeedbackPaths", "Settings", "settings", "as_datetime",
               "BATCH_SUFFIXES", "CHAMPION", "PREQUENTIAL_METRICS", "TAG_PREQUENTIAL", "TAG_BATCH",
               "TAG_VERSION", "TAG_MODEL", "TAG_SHA1"),
    "batches": ("Batch", "BatchReadError", "BatchLimitError", "list_batches", "scan_incoming",
                "refuse_entries", "read_batch", "check_batch", "event_keys", "in_store",
                "quarantine", "load_store", "validate_batch"),
    "apply": ("store_lock", "apply_batch", "apply_batches", "unrecorded"),
    "scoring": ("score_batch", "load_champion", "prequential"),
    "record": ("record_store", "dvc_record"),
    "loop": ("run", "status"),
    "cli": ("feedback_cli", "build_parser"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
