"""The interaction store: the feedback parts under ``<source>/feedback/`` (one parquet part per
applied batch) and their ledger ``applied.json`` (the commit point). Read by ingest (through
:func:`genre_tasks.data.adapters.load`) and written by :mod:`genre_tasks.feedback.apply`."""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Collection
from pathlib import Path

import numpy as np
import pandas as pd

from genre_tasks import schema
from genre_tasks.data.canonical import empty_interactions, finalize_interactions, null_column
from genre_tasks.errors import StageError

log = logging.getLogger("genre.ingest")


#: folder under the source dir holding the feedback store (one parquet part per applied batch)
STORE_DIR = "feedback"
#: the store's ledger: which parts are applied (written after the part is in place)
LEDGER_FILE = "applied.json"
#: what a batch id (file stem) may look like: safe as a file and folder name
BATCH_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def store_dir(source_dir: str | Path) -> Path:
    """``<source>/feedback``: the feedback store."""
    return Path(source_dir) / STORE_DIR


def ledger_path(source_dir: str | Path) -> Path:
    return store_dir(source_dir) / LEDGER_FILE


def part_path(source_dir: str | Path, batch_id: str) -> Path:
    """``<source>/feedback/<batch_id>.parquet``: the store part of one applied batch."""
    return store_dir(source_dir) / f"{batch_id}.parquet"


def read_ledger(source_dir: str | Path) -> dict[str, dict]:
    """``{batch_id: entry}`` of the applied batches (``{}`` when nothing was applied yet).

    An entry holds at least ``rows`` and ``sha1`` (:func:`content_hash` of the part).
    """
    path = ledger_path(source_dir)
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise StageError(f"{path}: the feedback ledger is not valid JSON ({exc}); restore it "
                         "with `dvc checkout data/source` or from the remote") from exc
    return dict(doc.get("batches") or {})


def canonical_interactions(df: pd.DataFrame) -> pd.DataFrame:
    """Exactly :data:`schema.INTERACTION_COLUMNS` with :data:`schema.INTERACTION_DTYPES`
    (``label`` / ``impression_id`` / ``rating`` added as nulls when absent; values coerced as
    the adapters do, unparseable values become nulls; a timestamp with nulls stays Int64)."""
    n = len(df)
    cols = {c: df[c].reset_index(drop=True) for c in schema.INTERACTION_COLUMNS if c in df.columns}
    for c in (schema.RATING, schema.LABEL, schema.IMPRESSION_ID):
        if c not in cols:
            cols[c] = null_column(n, schema.INTERACTION_DTYPES[c])
    return finalize_interactions(cols)


def content_hash(df: pd.DataFrame) -> str:
    """sha1 of the canonical content of an interaction table (values and row order, not the
    file bytes): two parts are identical iff their hashes are equal."""
    canon = canonical_interactions(df)
    rows = pd.util.hash_pandas_object(canon, index=False).to_numpy()
    h = hashlib.sha1(",".join(canon.columns).encode())
    h.update(rows.tobytes())
    return h.hexdigest()


def read_part(path: str | Path) -> pd.DataFrame:
    """One store part (or any canonical parquet) as a canonical interaction table."""
    return canonical_interactions(pd.read_parquet(path))


def read_store(source_dir: str | Path, verify: bool = True,
               locations: bool = False, exclude: Collection[str] = ()) -> tuple[pd.DataFrame, list[dict]]:
    """The applied parts of the feedback store, concatenated in batch-id order.

    Returns ``(interactions, parts)``: canonical interactions and ``[{batch_id, rows, path}]``.
    Only ledger-listed parts count (a part without a ledger entry is an interrupted apply: it is
    ignored with a warning). A listed part that is missing or whose content differs from the
    ledger (``verify``) raises StageError. ``locations``: add SOURCE_FILE (the part's path) and
    SOURCE_LINE (its 1-based row). ``exclude``: batch ids left out (the store as it was before
    they were applied).
    """
    skip = set(exclude)
    ledger = {b: e for b, e in read_ledger(source_dir).items() if b not in skip}
    folder = store_dir(source_dir)
    if folder.is_dir():
        orphans = sorted(p.stem for p in folder.glob("*.parquet")
                         if p.stem not in ledger and p.stem not in skip)
        if orphans:
            log.warning("feedback store: part(s) %s are not in the ledger %s (an interrupted apply; "
                        "the next feedback run completes or replaces them): ignored", orphans,
                        ledger_path(source_dir))
    frames, parts = [], []
    for batch_id in sorted(ledger):
        entry = ledger[batch_id]
        path = part_path(source_dir, batch_id)
        if not path.is_file():
            raise StageError(f"{path}: the store part of applied batch {batch_id} is missing "
                             f"(listed in {ledger_path(source_dir)}); restore data/source with "
                             "`dvc checkout data/source` / `dvc pull`")
        df = read_part(path)
        if len(df) != int(entry.get("rows", -1)) or (verify and entry.get("sha1")
                                                      and content_hash(df) != entry["sha1"]):
            raise StageError(f"{path}: content differs from the ledger entry of batch {batch_id} "
                             f"({len(df)} rows, ledger says {entry.get('rows')}); the store was "
                             "modified outside `genre feedback`")
        frames.append(_locate(df, path) if locations else df)
        parts.append({"batch_id": batch_id, "rows": int(len(df)), "path": str(path)})
    if not frames:
        return empty_interactions(), parts
    return pd.concat(frames, ignore_index=True), parts


def _locate(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The adapter's index (source lines) -> columns SOURCE_FILE / SOURCE_LINE."""
    lines = (df.index.to_numpy(dtype=np.int64) if df.index.name == schema.SOURCE_LINE
             else np.arange(1, len(df) + 1, dtype=np.int64))
    out = df.reset_index(drop=True)
    out[schema.SOURCE_FILE] = pd.Series([str(path)] * len(out), dtype="string")
    out[schema.SOURCE_LINE] = lines
    return out


