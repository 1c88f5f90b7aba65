"""Source adapters: each turns one input format into the canonical tables of :mod:`schema`.

    items, interactions = adapters.load(p, paths.source)

``items``: ``item_id``, ``title``, ``text`` (pandas ``string``), ``genres`` (a python
``list[str]`` per row, possibly empty), then the adapter's extra ``string`` columns.
``interactions``: exactly :data:`schema.INTERACTION_DTYPES` (``user_id``/``item_id`` string,
``timestamp`` int64 unix seconds UTC, ``rating`` float64, ``label`` Int8, ``impression_id``
string), in source row order.

Adapters are LENIENT ON CONTENT by design: the ``validate`` stage is where bad data is rejected
with file/row/rule messages, so an adapter never crashes on what a file contains:

* a 0-byte or header-only file gives an empty table with all canonical columns;
* a mapped column missing from the file leaves its canonical column out of the output;
* undecodable bytes become U+FFFD (``errors="replace"``) and stay in the text;
* unparseable numbers / times become nulls (a ``timestamp`` column holding nulls is then
  nullable ``Int64`` instead of ``int64``, so validate can point at the rows).

Only a missing file or an unknown adapter raises :class:`~genre_tasks.errors.StageError`
(and a file with no row structure left to hand on: an unclosed CSV quote, a corrupt parquet
file, an unsupported extension). A row with too many fields keeps the extras joined into its
last column; a row with too few is padded with nulls.

Feedback store (:mod:`genre_tasks.feedback`): new interactions accepted after the base data are
kept as one canonical parquet part per applied batch in ``<source>/feedback/<batch_id>.parquet``,
listed in the ledger ``<source>/feedback/applied.json`` (the commit point of an apply: a part
not in the ledger is an interrupted apply and is ignored). :func:`load` reads the base tables
with the adapter, keeps the base interactions before ``ingest.until`` (if set), then appends the
applied parts in batch-id order, then applies ``ingest.max_users``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from genre_tasks import schema
from genre_tasks.errors import StageError

if TYPE_CHECKING:
    from genre_tasks.ingest import IngestParams

log = logging.getLogger("genre.ingest")

_EPOCH = pd.Timestamp(0, tz="UTC")
_INT64_MAX = float(2**63 - 1024)  # largest float64 safely below the int64 limit


# --------------------------------------------------------------------------- reading files
def require_file(path: Path, key: str) -> Path:
    """Return ``path`` or raise StageError naming it and the params key that points to it."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: file not found (params: {key}). Put your files in "
                         f"{path.parent} (or run `genre source` for movielens-100k).")
    return path


def read_delimited(path: Path, *, sep: str, names: list[str] | None = None,
                   quoting: int = csv.QUOTE_NONE, key: str = "") -> pd.DataFrame:
    """Read a delimited text file with every column as pandas ``string`` (no type inference).

    ``names`` given: the file has no header and these are its columns; else the first line is
    the header. Only empty fields become null. Invalid UTF-8 is replaced by U+FFFD; a row with
    too many fields keeps its extra fields joined into the last column; a row with too few is
    padded with nulls. A 0-byte file gives an empty frame (``names`` as columns, if given).
    """
    path = require_file(path, key)
    if path.stat().st_size == 0:
        return pd.DataFrame({c: pd.Series(dtype="string") for c in (names or [])})
    kwargs = dict(sep=sep, header=None if names else 0, names=names, dtype=str,
                  index_col=False, quoting=quoting, keep_default_na=False, na_values=[""],
                  encoding="utf-8-sig", encoding_errors="replace")
    try:
        with warnings.catch_warnings():  # "header/data length mismatch ... loss of data"
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(path, engine="c", **kwargs)
    except pd.errors.EmptyDataError:
        return pd.DataFrame({c: pd.Series(dtype="string") for c in (names or [])})
    except (pd.errors.ParserError, pd.errors.ParserWarning) as exc:
        if "EOF inside string" in str(exc):  # an unclosed quote: no row structure left
            raise StageError(f"{path}: cannot be parsed (params: {key}): {exc}") from exc
        df = _read_ragged(path, sep=sep, names=names, quoting=quoting, key=key)
    return df.astype("string")


def _read_ragged(path: Path, *, sep: str, names: list[str] | None, quoting: int,
                 key: str) -> pd.DataFrame:
    """Fallback of :func:`read_delimited` for rows with too many fields (pandas drops or
    refuses them): extra fields are joined into the last column, short rows padded."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as fh:
            rows = [r for r in csv.reader(fh, delimiter=sep, quoting=quoting) if r]
    except csv.Error as exc:
        raise StageError(f"{path}: cannot be parsed (params: {key}): {exc}") from exc
    header = list(names) if names else (rows.pop(0) if rows else [])
    width, n_long = len(header), 0
    for i, row in enumerate(rows):
        if len(row) > width:
            n_long += 1
            rows[i] = row[: width - 1] + [sep.join(row[width - 1:])]
        elif len(row) < width:
            rows[i] = row + [None] * (width - len(row))
    log.warning("%s: %d row(s) had more than %d fields; their extra fields were kept in the "
                "last column", path, n_long, width)
    df = pd.DataFrame(rows, columns=header, dtype=object)
    return df.replace("", None)


def read_table(path: Path, key: str) -> pd.DataFrame:
    """Read a user's table by extension: ``.csv``, ``.tsv``/``.tab`` or ``.parquet``/``.pq``. CSV/TSV columns are all ``string``; parquet keeps its types."""
    path = require_file(path, key)
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        if path.stat().st_size == 0:
            return pd.DataFrame()
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # a corrupt file: nothing to hand on to validate
            raise StageError(f"{path}: not a readable parquet file (params: {key}): {exc}") from exc
    if name.endswith(".csv"):
        return read_delimited(path, sep=",", quoting=csv.QUOTE_MINIMAL, key=key)
    if name.endswith((".tsv", ".tab")):
        return read_delimited(path, sep="\t", quoting=csv.QUOTE_MINIMAL, key=key)
    raise StageError(f"{path}: unsupported file type (params: {key}); use .csv, .tsv or .parquet")


# --------------------------------------------------------------------------- value parsing
def to_str(s: pd.Series) -> pd.Series:
    """Any column -> pandas ``string`` (integral floats print without ``.0``, nulls stay null)."""
    if isinstance(s.dtype, pd.StringDtype) and s.dtype.na_value is pd.NA:
        return s
    if pd.api.types.is_float_dtype(s):
        f = s.astype("float64")
        finite = f[np.isfinite(f)]
        if len(finite) and (finite == np.round(finite)).all() and finite.abs().max() < 2**53:
            return f.round().astype("Int64").astype("string")
    if s.dtype == object:  # arbitrary python objects, e.g. lists: str() them
        return s.map(lambda v: v if v is None or isinstance(v, str) or _isna(v) else str(v)
                     ).astype("string")
    return s.astype("string")


def _isna(v: object) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def to_float(s: pd.Series) -> pd.Series:
    """-> float64; anything non-numeric becomes NaN."""
    return pd.to_numeric(_strip(s), errors="coerce").astype("Float64").astype("float64")


def to_label(s: pd.Series) -> pd.Series:
    """-> Int8; non-numeric, non-integral or out-of-int8-range values become null."""
    f = to_float(s)
    ok = np.isfinite(f) & (f == np.round(f)) & (f.abs() <= 127)
    out = pd.Series(pd.array([pd.NA] * len(f), dtype="Int8"), index=s.index)
    out[ok] = f[ok].astype("int8")
    return out


def to_timestamp(s: pd.Series) -> pd.Series:
    """-> nullable Int64 unix seconds (UTC), floored.

    Numbers are taken as seconds; other strings are parsed as date-times (naive = UTC), first
    with the format pandas infers from the column, then element by element. Unparseable -> null.
    """
    if pd.api.types.is_bool_dtype(s):
        s = s.astype("string")
    if isinstance(s.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(s):
        secs = _datetime_seconds(pd.to_datetime(s, utc=True))
    elif pd.api.types.is_numeric_dtype(s):
        secs = pd.to_numeric(s, errors="coerce").astype("float64")
    else:
        text = _strip(to_str(s))
        secs = pd.to_numeric(text, errors="coerce").astype("Float64").astype("float64")
        todo = secs.isna() & text.notna() & (text != "")
        if todo.any():
            secs[todo] = _parse_datetimes(text[todo])
    ok = np.isfinite(secs) & (secs.abs() < _INT64_MAX)
    out = pd.Series(pd.array([pd.NA] * len(s), dtype="Int64"), index=s.index)
    out[ok] = np.floor(secs[ok]).astype("int64")
    return out


def _parse_datetimes(text: pd.Series) -> pd.Series:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "could not infer format" etc.
        dt = pd.to_datetime(text.astype(object), errors="coerce", utc=True)
        again = dt.isna()
        if again.any():
            dt[again] = pd.to_datetime(text[again].astype(object), errors="coerce", utc=True,
                                       format="mixed")
    return _datetime_seconds(dt)


def _datetime_seconds(dt: pd.Series) -> pd.Series:
    """tz-aware datetimes -> float64 seconds since the epoch (NaT -> NaN)."""
    delta = (dt - _EPOCH) / pd.Timedelta(seconds=1)
    return delta.astype("float64")


def _strip(s: pd.Series) -> pd.Series:
    if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
        return s
    return to_str(s).str.strip()


def split_list(s: pd.Series, sep: str | None) -> pd.Series:
    """Column -> object column of python ``list[str]`` (split on ``sep``, or whitespace if
    ``None``; items stripped, empty items dropped; null -> ``[]``; list-like cells kept)."""
    def one(v: object) -> list[str]:
        if isinstance(v, (list, tuple, np.ndarray)):
            return [str(x).strip() for x in v if x is not None and str(x).strip()]
        if v is None or _isna(v):
            return []
        parts = str(v).split(sep) if sep is not None else str(v).split()
        return [x.strip() for x in parts if x.strip()]

    return pd.Series([one(v) for v in s.astype(object)], index=s.index, dtype=object)


def join_text(*parts: pd.Series, sep: str = ". ") -> pd.Series:
    """Row-wise join of string columns with ``sep``, skipping null/blank parts -> ``string``."""
    cols = [to_str(p).astype(object) for p in parts]
    joined = [sep.join(str(v).strip() for v in row if isinstance(v, str) and v.strip())
              for row in zip(*cols)]
    index = parts[0].index if parts else None
    return pd.Series(joined, index=index, dtype="string")


# --------------------------------------------------------------------------- canonical frames
def empty_items() -> pd.DataFrame:
    """An empty item table with the canonical columns and dtypes."""
    return pd.DataFrame({schema.ITEM_ID: pd.Series(dtype="string"),
                         schema.TITLE: pd.Series(dtype="string"),
                         schema.TEXT: pd.Series(dtype="string"),
                         schema.GENRES: pd.Series(dtype=object)})


def empty_interactions() -> pd.DataFrame:
    """An empty interaction table with exactly :data:`schema.INTERACTION_DTYPES`."""
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in schema.INTERACTION_DTYPES.items()})


def finalize_items(cols: dict[str, pd.Series]) -> pd.DataFrame:
    """Canonical column order (``ITEM_COLUMNS`` present, then extras) and dtypes.

    ``cols`` maps column name -> Series (all the same length/index); ``genres`` must already
    hold lists. Canonical columns not in ``cols`` are left out (lenient: validate reports them).
    """
    order = [c for c in schema.ITEM_COLUMNS if c in cols] + \
            [c for c in cols if c not in schema.ITEM_COLUMNS]
    out = {}
    for c in order:
        out[c] = cols[c] if c == schema.GENRES else to_str(cols[c])
    df = pd.DataFrame(out, columns=order)
    return df.reset_index(drop=True)


def finalize_interactions(cols: dict[str, pd.Series]) -> pd.DataFrame:
    """Canonical column order and :data:`schema.INTERACTION_DTYPES` for the columns present.

    ``timestamp`` must be Int64 seconds: it is ``int64`` when it has no nulls, else it stays
    nullable ``Int64`` (validate reports the null rows).
    """
    out = {}
    for c, dtype in schema.INTERACTION_DTYPES.items():
        if c not in cols:
            continue
        s = cols[c]
        if c in (schema.USER_ID, schema.ITEM_ID, schema.IMPRESSION_ID):
            s = to_str(s)
        elif c == schema.TIMESTAMP:
            s = s if s.dtype == "Int64" else to_timestamp(s)
            if s.notna().all():
                s = s.astype("int64")
            else:
                log.warning("%d interaction(s) have no valid timestamp (left null)",
                            int(s.isna().sum()))
        elif c == schema.RATING:
            s = to_float(s)
        elif c == schema.LABEL:
            s = s if s.dtype == "Int8" else to_label(s)
        out[c] = s.reset_index(drop=True)
    return pd.DataFrame(out, columns=list(out))


def null_column(n: int, dtype: str) -> pd.Series:
    """An all-null column of length ``n`` (``dtype`` from INTERACTION_DTYPES)."""
    return pd.Series(pd.array([pd.NA] * n, dtype=dtype) if dtype != "float64"
                     else np.full(n, np.nan))


# --------------------------------------------------------------------------- max_users
def user_order_key(user_ids: pd.Series) -> list[str]:
    """Distinct non-null user ids, smallest first: numeric order when all are digits."""
    ids = pd.unique(user_ids.dropna().astype(str))
    if len(ids) and all(re.fullmatch(r"\d+", u) for u in ids):
        return sorted(ids, key=lambda u: (int(u), u))
    return sorted(ids)


def keep_first_users(interactions: pd.DataFrame, max_users: int | None) -> pd.DataFrame:
    """Keep the ``max_users`` users with the smallest ids and their rows (order kept)."""
    if max_users is None or schema.USER_ID not in interactions.columns:
        return interactions
    keep = set(user_order_key(interactions[schema.USER_ID])[:max_users])
    mask = interactions[schema.USER_ID].astype(object).isin(keep).to_numpy(dtype=bool)
    return interactions[mask].reset_index(drop=True)


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Adapter:
    """One input format: its source files and its reader."""

    name: str
    #: (params, source_dir) -> [(path, params key), ...] the adapter reads
    files: Callable[[IngestParams, Path], list[tuple[Path, str]]]
    #: (params, source_dir) -> (items, interactions); ``max_users`` not applied yet
    read: Callable[[IngestParams, Path], tuple[pd.DataFrame, pd.DataFrame]]


from genre_tasks.adapters import mind, movielens, tabular  # noqa: E402  (use helpers above)

ADAPTERS: dict[str, Adapter] = {
    "movielens-100k": Adapter("movielens-100k", movielens.files, movielens.read),
    "mind": Adapter("mind", mind.files, mind.read),
    "tabular": Adapter("tabular", tabular.files, tabular.read),
}


def get(name: str) -> Adapter:
    """The adapter registered as ``name`` (StageError naming ``ingest.adapter`` otherwise)."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise StageError(f"params ingest.adapter: unknown adapter {name!r}; "
                         f"known: {sorted(ADAPTERS)}") from None


def source_files(p: IngestParams, source_dir: Path) -> list[Path]:
    """The files adapter ``p.adapter`` reads under ``source_dir`` (they may not exist yet)."""
    return [path for path, _ in get(p.adapter).files(p, Path(source_dir))]


def load(p: IngestParams, source_dir: Path, *, feedback: bool = True,
         slice_users: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read ``source_dir`` with adapter ``p.adapter``; apply ``p.until``, append the feedback
    store, apply ``p.max_users``.

    Returns ``(items, interactions)`` in the canonical schema (see module docstring); all items
    are kept when ``max_users`` slices the users. ``feedback=False`` leaves the store parts out
    (the base data only); ``slice_users=False`` keeps every user (the whole store).
    """
    adapter = get(p.adapter)
    source_dir = Path(source_dir)
    for path, key in adapter.files(p, source_dir):
        require_file(path, key)
    items, interactions = adapter.read(p, source_dir)
    until = p.until_timestamp() if hasattr(p, "until_timestamp") else None
    if until is not None:
        n = len(interactions)
        interactions = apply_until(interactions, until)
        log.info("ingest.until %s: kept %d of %d base interaction(s)", p.until, len(interactions), n)
    if feedback:
        extra, parts = read_store(source_dir)
        if parts:
            interactions = append_interactions(interactions, extra)
            log.info("feedback store: %d batch(es) added %d interaction(s) (%s .. %s)", len(parts),
                     len(extra), parts[0]["batch_id"], parts[-1]["batch_id"])
    if slice_users:
        interactions = keep_first_users(interactions, p.max_users)
    return items, interactions


def apply_until(interactions: pd.DataFrame, until: int | None) -> pd.DataFrame:
    """Rows with ``timestamp < until`` (unix seconds; rows without a timestamp are kept so that
    validate reports them). ``until`` None: all rows."""
    if until is None or schema.TIMESTAMP not in interactions.columns:
        return interactions
    late = interactions[schema.TIMESTAMP].ge(until).fillna(False).to_numpy(dtype=bool)
    return interactions[~late].reset_index(drop=True)


def append_interactions(base: pd.DataFrame, extra: pd.DataFrame) -> pd.DataFrame:
    """``base`` then ``extra`` (canonical), keeping ``base``'s columns and dtypes where possible."""
    if not len(extra):
        return base
    if not len(base):
        return extra.reset_index(drop=True)
    out = pd.concat([base, extra], ignore_index=True)
    for c, dtype in schema.INTERACTION_DTYPES.items():
        if c in out.columns and str(out[c].dtype) != dtype:
            try:
                out[c] = out[c].astype(dtype)
            except (TypeError, ValueError):  # e.g. nulls in a timestamp column: keep Int64
                pass
    return out


# --------------------------------------------------------------------------- feedback store
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


def read_store(source_dir: str | Path, verify: bool = True) -> tuple[pd.DataFrame, list[dict]]:
    """The applied parts of the feedback store, concatenated in batch-id order.

    Returns ``(interactions, parts)``: canonical interactions and ``[{batch_id, rows, path}]``.
    Only ledger-listed parts count (a part without a ledger entry is an interrupted apply: it is
    ignored with a warning). A listed part that is missing or whose content differs from the
    ledger (``verify``) raises StageError.
    """
    ledger = read_ledger(source_dir)
    folder = store_dir(source_dir)
    if folder.is_dir():
        orphans = sorted(p.stem for p in folder.glob("*.parquet") if p.stem not in ledger)
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
        frames.append(df)
        parts.append({"batch_id": batch_id, "rows": int(len(df)), "path": str(path)})
    if not frames:
        return empty_interactions(), parts
    return pd.concat(frames, ignore_index=True), parts
