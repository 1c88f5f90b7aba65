"""Replay a dataset's real future as weekly feedback batches (MovieLens-100k by default).

The feedback loop is demonstrated on real data: the initial store holds the interactions before
a cutoff date (``ingest.until``), the rest is cut into weekly batches in time order that are
released one at a time into the landing folder, as if they had just arrived::

    # params.yaml: ingest.until: "1998-03-02"  (then train the first champion: dvc repro)
    genre feedback replay --init            # -> data/feedback/replay/pending/1998-W10.parquet ...
    genre feedback replay --next            # 1998-W10 -> data/feedback/incoming/
    genre feedback replay --next --corrupt  # a corrupted copy of the next batch (quarantine demo)
    genre feedback replay --status

MovieLens-100k spans 1997-09-20 .. 1998-04-22. The default cutoff 1998-03-02 (a Monday) keeps
78,177 interactions in the initial store and cuts the remaining 21,823 into 8 ISO weeks
``1998-W10`` .. ``1998-W17`` (800 .. 8,700 interactions each). Batches are ISO weeks (Monday
00:00 UTC to the next Monday), named ``<ISO year>-W<week>`` (ids sort in time order); with a
cutoff that is not a Monday the first batch is the rest of the cutoff's week. Each batch is in
the canonical interactions schema, rows in source order. Together with the initial store they
are exactly the full dataset.

State: ``data/feedback/replay/pending/<batch_id>.parquet`` (not released yet) and
``data/feedback/replay/manifest.json`` (cutoff, every batch with rows / time range / sha1,
which were released, which corrupted copies were written).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from genre_tasks import io, logs
from genre_tasks import schema as S
from genre_tasks.errors import StageError

log = logging.getLogger("genre.replay")

#: a Monday: 8 whole ISO weeks of MovieLens-100k follow it (78,177 interactions before it)
DEFAULT_CUTOFF = "1998-03-02"
#: timestamp of the "future" row of a corrupted batch (2100-01-01 UTC)
FUTURE_TIMESTAMP = 4_102_444_800
#: rows of a corrupted batch (taken from the head of the next pending batch)
CORRUPT_ROWS = 20
UNKNOWN_ITEM = "no-such-item-999999"


class ReplayPaths:
    """``<feedback workdir>/replay/``: pending batches and the manifest."""

    def __init__(self, fp) -> None:
        self.fp = fp
        self.dir = fp.dir / "replay"
        self.pending = self.dir / "pending"
        self.manifest = self.dir / "manifest.json"


def week_id(ts: int) -> str:
    """ISO week of a unix time: ``"1998-W10"`` (sorts in time order)."""
    year, week, _ = dt.datetime.fromtimestamp(int(ts), dt.timezone.utc).isocalendar()
    return f"{year:04d}-W{week:02d}"


def weekly_batches(interactions: pd.DataFrame, cutoff_ts: int) -> list[tuple[str, pd.DataFrame]]:
    """The rows with ``timestamp >= cutoff_ts`` as ``[(week id, rows)]`` in time order.

    Rows keep their source order within a batch (the temporal tie-breaker downstream).
    Rows without a timestamp belong to no batch.
    """
    ts = interactions[S.TIMESTAMP]
    late = interactions[ts.ge(cutoff_ts).fillna(False).to_numpy(dtype=bool)]
    if not len(late):
        return []
    weeks = np.array([week_id(t) for t in late[S.TIMESTAMP].to_numpy(np.int64)])
    out = []
    for wid in sorted(set(weeks)):
        out.append((wid, late[weeks == wid].reset_index(drop=True)))
    return out


def _context(params: dict, paths: S.Paths):
    from genre_tasks import feedback

    s = feedback.settings(params)
    fp = feedback.FeedbackPaths(paths, s.feedback)
    return s, fp, ReplayPaths(fp)


def reset_state(fp, rp: ReplayPaths) -> list[str]:
    """Delete the replay state, the feedback folders and the store (parts + ledger).

    For restarting a demo: the store then holds the base data again."""
    from genre_tasks.data import adapters

    removed = []
    for path in (rp.dir, fp.incoming, fp.quarantine, fp.applied, fp.validated, fp.prequential,
                 fp.recorded, adapters.store_dir(fp.source)):
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(fp.rel(path))
        elif path.exists():
            path.unlink()
            removed.append(fp.rel(path))
    log.warning("replay reset: removed %s", removed or "nothing")
    return removed


def init(params: dict, paths: S.Paths, cutoff: str | None = None, reset: bool = False) -> dict:
    """Cut the interactions from ``cutoff`` on into weekly pending batches.

    ``cutoff`` defaults to ``ingest.until`` and must equal it: the initial store (the base data
    cut at ``ingest.until``) has to end exactly where the replay starts. Idempotent: a second
    ``--init`` with the same cutoff changes nothing. A different cutoff, or a store that already
    holds feedback batches, needs ``reset=True`` (which deletes the replay state, the feedback
    folders and the store parts first).
    """
    from genre_tasks.data import adapters
    from genre_tasks.data.ingest import iso_timestamp, write_table

    s, fp, rp = _context(params, paths)
    with logs.stage("replay-init") as slog:
        until = s.ingest.until
        cutoff = cutoff or until
        if cutoff is None:
            raise StageError(
                "replay: no cutoff. Set `ingest.until` in params.yaml (e.g. "
                f"`until: \"{DEFAULT_CUTOFF}\"`, or in an --override file), train the first "
                "champion on that initial store (`dvc repro`), then run "
                "`genre feedback replay --init`.")
        cutoff_ts = iso_timestamp(cutoff, "replay --cutoff")
        if s.ingest.until_timestamp() != cutoff_ts:
            raise StageError(
                f"replay: the initial store must end where the replay starts, but ingest.until is "
                f"{until!r} and the cutoff {cutoff!r}. Set `ingest.until: \"{cutoff}\"` in "
                "params.yaml (or an --override file) and re-run ingest and the training pipeline "
                "(`dvc repro`) so the champion is trained on the initial store.")
        if reset:
            reset_state(fp, rp)
        if rp.manifest.exists():
            manifest = io.read_json(rp.manifest)
            if manifest.get("cutoff_ts") == cutoff_ts:
                slog.logger.info("replay already initialised with cutoff %s: nothing to do", cutoff)
                return {**_status(manifest, rp, fp), "initialised": False}
            raise StageError(f"replay: already initialised with cutoff {manifest.get('cutoff')} "
                             f"({rp.manifest}); use --reset to start again with {cutoff}")
        ledger = adapters.read_ledger(fp.source)
        if ledger:
            raise StageError(f"replay: the store already holds {len(ledger)} feedback batch(es) "
                             f"({', '.join(sorted(ledger)[:5])} ...); use --reset to start a "
                             "replay from the base data")
        full_params = dataclasses.replace(s.ingest, until=None)
        _, full = adapters.load(full_params, fp.source, feedback=False, slice_users=False)
        slog.read(fp.source, f"{len(full)} interactions ({s.ingest.adapter})")
        batches = weekly_batches(full, cutoff_ts)
        if not batches:
            raise StageError(f"replay: no interaction at or after the cutoff {cutoff}")
        entries = []
        for batch_id, df in batches:
            df = adapters.canonical_interactions(df)
            target = rp.pending / f"{batch_id}.parquet"
            write_table(df, target)
            ts = df[S.TIMESTAMP]
            entries.append({"batch_id": batch_id, "rows": int(len(df)),
                            "users": int(df[S.USER_ID].nunique()),
                            "first": _iso(int(ts.min())), "last": _iso(int(ts.max())),
                            "sha1": adapters.content_hash(df)})
        slog.wrote(rp.pending, f"{len(entries)} weekly batches")
        n_late = sum(e["rows"] for e in entries)
        manifest = {"cutoff": str(cutoff), "cutoff_ts": cutoff_ts, "adapter": s.ingest.adapter,
                    "total_rows": int(len(full)), "initial_rows": int(len(full)) - n_late
                    - int(full[S.TIMESTAMP].isna().sum()), "batches": entries, "released": [],
                    "corrupted": []}
        io.write_json(manifest, rp.manifest)
        slog.wrote(rp.manifest, "replay manifest")
        return {**_status(manifest, rp, fp), "initialised": True}


def _iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _manifest(rp: ReplayPaths) -> dict:
    if not rp.manifest.exists():
        raise StageError(f"replay: not initialised ({rp.manifest} missing); run "
                         "`genre feedback replay --init` first")
    return io.read_json(rp.manifest)


def _status(manifest: dict, rp: ReplayPaths, fp) -> dict:
    released = manifest.get("released", [])
    pending = [b["batch_id"] for b in manifest["batches"] if b["batch_id"] not in released]
    return {"cutoff": manifest["cutoff"], "initial_rows": manifest["initial_rows"],
            "total_rows": manifest["total_rows"], "n_batches": len(manifest["batches"]),
            "batch_rows": {b["batch_id"]: b["rows"] for b in manifest["batches"]},
            "released": released, "pending": pending, "corrupted": manifest.get("corrupted", []),
            "pending_dir": fp.rel(rp.pending), "incoming_dir": fp.rel(fp.incoming)}


def replay_status(params: dict, paths: S.Paths) -> dict:
    """Cutoff, batches with their sizes, released and pending ids."""
    _, fp, rp = _context(params, paths)
    return _status(_manifest(rp), rp, fp)


def corrupt_batch(batch: pd.DataFrame, store: pd.DataFrame, n: int = CORRUPT_ROWS
                  ) -> tuple[pd.DataFrame, list[str]]:
    """A deliberately bad copy of the head of ``batch`` (canonical) and what is wrong with it:
    a rating of 11, an unknown item id, a timestamp in 2100 (after any logical date), an event
    duplicated within the batch and one already in ``store``."""
    bad = batch.head(max(n, 6)).copy().reset_index(drop=True)
    while len(bad) < 6:  # tiny batches: repeat rows (they are made distinct below)
        bad = pd.concat([bad, bad], ignore_index=True).head(6)
    defects = []
    bad.loc[0, S.RATING] = 11.0
    defects.append(f"row 0: rating 11 (user {bad.at[0, S.USER_ID]}, item {bad.at[0, S.ITEM_ID]})")
    bad.loc[1, S.ITEM_ID] = UNKNOWN_ITEM
    defects.append(f"row 1: unknown item id {UNKNOWN_ITEM!r}")
    bad.loc[2, S.TIMESTAMP] = FUTURE_TIMESTAMP
    defects.append(f"row 2: timestamp {FUTURE_TIMESTAMP} (2100-01-01, in the future)")
    bad.loc[3] = bad.loc[4]
    defects.append("rows 3 and 4: the same event twice")
    if len(store):
        first = store.iloc[0]
        for c in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.RATING, S.LABEL, S.IMPRESSION_ID):
            bad.loc[5, c] = first[c]
        defects.append(f"row 5: an event already in the store (user {first[S.USER_ID]}, "
                       f"item {first[S.ITEM_ID]}, timestamp {first[S.TIMESTAMP]})")
    from genre_tasks.data import adapters

    return adapters.canonical_interactions(bad), defects


def next_batch(params: dict, paths: S.Paths, corrupt: bool = False) -> dict:
    """Release the next pending batch into the landing folder (``corrupt``: release a corrupted
    copy ``<next id>-corrupt`` instead and keep the real batch pending).

    Crash-safe and idempotent: the file is copied into the landing folder atomically, then the
    manifest marks it released, then the pending file goes; a repeat after a crash re-releases
    the same content (the feedback loop recognises an applied batch id).
    """
    from genre_tasks.data import adapters
    from genre_tasks import feedback
    from genre_tasks.data.ingest import write_table

    s, fp, rp = _context(params, paths)
    with logs.stage("replay-next") as slog:
        manifest = _manifest(rp)
        released = manifest.setdefault("released", [])
        pending = [b["batch_id"] for b in manifest["batches"] if b["batch_id"] not in released]
        if not pending:
            slog.logger.info("replay finished: every batch was released")
            return {**_status(manifest, rp, fp), "released_now": None}
        batch_id = pending[0]
        src = rp.pending / f"{batch_id}.parquet"
        if not src.exists():
            raise StageError(f"replay: pending batch {src} is missing; re-run --init --reset")
        if corrupt:
            batch = adapters.read_part(src)
            _, store = feedback.load_store(s, fp)
            bad, defects = corrupt_batch(batch, store)
            bad_id = f"{batch_id}-corrupt"
            target = fp.incoming / f"{bad_id}.parquet"
            write_table(bad, target)
            slog.wrote(target, f"corrupted copy of {batch_id}: {len(bad)} rows")
            if bad_id not in manifest.setdefault("corrupted", []):
                manifest["corrupted"].append(bad_id)
            io.write_json(manifest, rp.manifest)
            return {**_status(manifest, rp, fp), "released_now": bad_id, "rows": int(len(bad)),
                    "corrupted_from": batch_id, "defects": defects, "file": fp.rel(target)}
        target = fp.incoming / f"{batch_id}.parquet"
        with io.atomic_path(target) as tmp:
            shutil.copyfile(src, tmp)
        slog.wrote(target, f"batch {batch_id}")
        released.append(batch_id)
        io.write_json(manifest, rp.manifest)
        src.unlink()
        entry = next(b for b in manifest["batches"] if b["batch_id"] == batch_id)
        return {**_status(manifest, rp, fp), "released_now": batch_id, "rows": entry["rows"],
                "first": entry["first"], "last": entry["last"], "file": fp.rel(target)}


__all__ = ["DEFAULT_CUTOFF", "week_id", "weekly_batches", "init", "next_batch", "replay_status",
           "corrupt_batch", "reset_state", "ReplayPaths"]
