"""Source adapters: each turns one input format into the canonical tables of :mod:`schema`.

    items, interactions = adapters.load(p, paths.source)

``items``: ``item_id``, ``title``, ``text`` (pandas ``string``), ``genres`` (a python
``list[str]`` per row, possibly empty), then the adapter's extra ``string`` columns.
``interactions``: exactly :data:`schema.INTERACTION_DTYPES` (``user_id``/``item_id`` string,
``timestamp`` int64 unix seconds UTC, ``rating`` float64, ``label`` Int8, ``impression_id``
string), in source row order.

Adapters are STRICT ON FORM, lenient on content. A file is refused with
:class:`InputError`, naming the user's file, the 1-based line (or parquet row), the column,
the raw value and the rule, when it has: invalid UTF-8 or a U+FFFD replacement character, a
row with more or fewer fields than the header (or the format's fixed columns), a duplicate
header name, broken quoting, or a value that does not parse as what its column holds (a time,
a number, a label, a MIND impression entry). Content rules (bounds, nulls, unknown ids,
duplicates) are the ``validate`` stage's; every adapter output keeps, per row, where it came
from (the frames' index is the source line; :func:`load` turns it into the columns
:data:`schema.SOURCE_FILE` / :data:`schema.SOURCE_LINE`), so validate's messages point into
the user's files too. A 0-byte or header-only file gives an empty table; a mapped column
missing from the file leaves its canonical column out (validate reports it).

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
import io as io_module
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
    from genre_tasks.data.ingest import IngestParams

log = logging.getLogger("genre.ingest")

_EPOCH = pd.Timestamp(0, tz="UTC")
_INT64_MAX = float(2**63 - 1024)  # largest float64 safely below the int64 limit


# --------------------------------------------------------------------------- located problems
#: most problems kept (and shown) per refused file; the total is always counted
MAX_PROBLEMS = 1000
SHOWN_PROBLEMS = 10
#: the replacement character a lossy decoder leaves for bytes it could not decode
REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class Problem:
    """One refused value: where it is in the USER's file (1-based line, or row of a parquet
    file), which column, the raw value and the rule it breaks."""

    file: str
    line: int | None
    column: str | None
    value: object
    rule: str

    def __str__(self) -> str:
        unit = "row" if str(self.file).lower().endswith((".parquet", ".pq")) else "line"
        where = self.file + (f" {unit} {self.line}" if self.line is not None else "")
        if self.column is not None:
            where += f", column {self.column}"
        value = "" if self.value is None else f" {show_value(self.value)}"
        return f"{where}:{value} - rule: {self.rule}"


def show_value(value: object, limit: int = 80) -> str:
    """repr of a raw value, cut to ``limit`` characters, U+FFFD spelled out."""
    text = repr(value if not isinstance(value, str) or len(value) <= limit
                else value[:limit] + "...")
    return text.replace(REPLACEMENT_CHAR, "\\ufffd")


class InputError(StageError):
    """A source file the adapter refuses: every problem located in the user's file."""

    def __init__(self, file: str, problems: list[Problem], total: int) -> None:
        self.file, self.problems, self.total = file, problems, total
        lines = [f"{file}: refused, {total} problem(s) (file line/row is 1-based):"]
        lines += [f"  {p}" for p in problems[:SHOWN_PROBLEMS]]
        if total > SHOWN_PROBLEMS:
            lines.append(f"  ... and {total - SHOWN_PROBLEMS} more")
        super().__init__("\n".join(lines))


class Problems:
    """Collects the problems of one file; :meth:`raise_if_any` refuses it."""

    def __init__(self, file: str | Path) -> None:
        self.file = str(file)
        self.items: list[Problem] = []
        self.total = 0

    def add(self, line: int | None, column: str | None, value: object, rule: str) -> None:
        self.total += 1
        if len(self.items) < MAX_PROBLEMS:
            self.items.append(Problem(self.file, None if line is None else int(line), column,
                                      value, rule))

    def unparsed(self, raw: pd.Series, parsed: pd.Series, column: str, rule: str) -> None:
        """Refuse values that are present in ``raw`` but null after parsing (``raw``'s index
        is the 1-based line of each row)."""
        text = _strip(to_str(raw))
        bad = (text.notna() & (text != "")).to_numpy(dtype=bool) & \
            parsed.isna().to_numpy(dtype=bool)
        for line, value in zip(raw.index[bad][:MAX_PROBLEMS], raw[bad].iloc[:MAX_PROBLEMS]):
            self.add(line, column, value, rule)
        self.total += max(0, int(bad.sum()) - MAX_PROBLEMS)

    def raise_if_any(self) -> None:
        if self.total:
            raise InputError(self.file, self.items, self.total)


# --------------------------------------------------------------------------- reading files
def require_file(path: Path, key: str) -> Path:
    """Return ``path`` or raise StageError naming it and the params key that points to it."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: file not found (params: {key}). Put your files in "
                         f"{path.parent} (or run `genre source` for movielens-100k).")
    return path


def decode_utf8(data: bytes, problems: Problems, sep: str | None = None,
                header: list[str] | None = None) -> str:
    """Bytes -> text, strictly: every invalid UTF-8 sequence and every U+FFFD replacement
    character already in the text is a problem at its 1-based line and column (the field,
    counted by ``sep``, named by ``header`` when given). A leading BOM is dropped."""
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError:
        text = data[start:].decode("utf-8", errors="replace")
        pos = start
        while len(problems.items) < SHOWN_PROBLEMS:
            try:
                data[pos:].decode("utf-8")
                break
            except UnicodeDecodeError as exc:
                bad = pos + exc.start
                _locate_bytes(data, bad, pos + exc.end, problems, sep, header)
                pos += exc.end
        problems.total = max(problems.total, text.count(REPLACEMENT_CHAR))
        return text
    if REPLACEMENT_CHAR in text:
        raw = text.encode("utf-8")
        for i, m in enumerate(re.finditer(REPLACEMENT_CHAR.encode(), raw)):
            if i >= SHOWN_PROBLEMS:
                problems.total += 1
                continue
            _locate_bytes(raw, m.start(), m.end(), problems, sep, header,
                          rule="no U+FFFD replacement character (the text was decoded lossily "
                               "before it reached this file)")
    return text


def _locate_bytes(data: bytes, bad: int, end: int, problems: Problems, sep: str | None,
                  header: list[str] | None, rule: str = "") -> None:
    line_start = data.rfind(b"\n", 0, bad) + 1
    line_end = data.find(b"\n", bad)
    line_end = len(data) if line_end < 0 else line_end
    line_no = data.count(b"\n", 0, bad) + 1
    column = None
    value: object = data[line_start:line_end]
    if sep is not None:
        k = data.count(sep.encode(), line_start, bad)
        fields = data[line_start:line_end].split(sep.encode())
        value = fields[k] if k < len(fields) else value
        column = header[k] if header and k < len(header) else f"field {k + 1}"
    if isinstance(value, bytes):
        value = value.rstrip(b"\r")
    problems.add(line_no, column, value,
                 rule or f"text is valid UTF-8 (byte {data[bad:end]!r} at byte offset {bad} "
                         f"is not)")


def read_delimited(path: Path, *, sep: str, names: list[str] | None = None,
                   quoting: int = csv.QUOTE_NONE, key: str = "", data: bytes | None = None,
                   max_rows: int | None = None, label: str | None = None) -> pd.DataFrame:
    """Read a delimited text file strictly, every column as pandas ``string``.

    ``names`` given: the file has no header and these are its columns; else the first
    non-blank line is the header. The returned frame's index is the 1-based line each row
    starts on (blank lines skipped), so callers can point back into the file. Only empty
    fields become null. Refused with :class:`InputError` (file, line, column, raw value,
    rule): invalid UTF-8, a U+FFFD replacement character, a row with more or fewer fields
    than the header / ``names``, a duplicate header name, a NUL byte or broken quoting.
    ``data``: the file's bytes, already read (feedback batches: read once, no-follow);
    ``max_rows``: refuse (StageError) a file with more data rows; ``label``: the file name
    used in messages (default ``path``).
    """
    path = Path(path)
    if data is None:
        data = require_file(path, key).read_bytes()
    file = label or str(path)
    problems = Problems(file)
    header_bytes = data.split(b"\n", 1)[0] if names is None else b""
    header_guess = (header_bytes.decode("utf-8", "replace").rstrip("\r").split(sep)
                    if names is None else list(names))
    text = decode_utf8(data, problems, sep=sep, header=header_guess)
    problems.raise_if_any()
    csv.field_size_limit(2**31 - 1)
    # lines end at "\n" only (a "\r\n" ending is fine; a lone "\r" is not a line break but
    # broken input, refused at its line): line numbers agree with decode_utf8's and editors'
    reader = csv.reader(io_module.StringIO(text, newline="\n"), delimiter=sep,
                        quoting=quoting, strict=True)
    header = list(names) if names is not None else None
    rows: list[list[str]] = []
    lines: list[int] = []
    previous = 0
    try:
        for record in reader:
            first, previous = previous + 1, reader.line_num
            if not record or record == [""]:
                continue  # blank line
            if header is None:
                header = record
                dup = sorted({c for c in header if header.count(c) > 1})
                for c in dup:
                    problems.add(first, c, c, "column names in the header are unique")
                continue
            if len(record) != len(header):
                problems.add(first, None, sep.join(record),
                             f"a row has {len(header)} {_sep_name(sep)}-separated fields "
                             f"({', '.join(header)}); this one has {len(record)}")
                continue
            rows.append(record)
            lines.append(first)
            if max_rows is not None and len(rows) > max_rows:
                raise StageError(f"{file}: more than {max_rows} rows (limit)")
    except csv.Error as exc:
        why = ("a carriage return (\\r) outside quotes that does not end the line as \\r\\n"
               if "new-line character" in str(exc) else str(exc))
        problems.add(reader.line_num or 1, None, None, f"the file parses as {_sep_name(sep)}-"
                     f"separated values ({why})")
    problems.raise_if_any()
    columns = header or []
    index = pd.Index(np.asarray(lines, dtype=np.int64), name=schema.SOURCE_LINE)
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype="string") for c in columns},
                            index=index)
    out = {}
    for i, c in enumerate(columns):
        col = pd.array([r[i] for r in rows], dtype="string")
        out[c] = pd.Series(col, index=index).replace("", pd.NA)
    return pd.DataFrame(out, index=index)


def _sep_name(sep: str) -> str:
    return {"\t": "tab", ",": "comma"}.get(sep, repr(sep))


def read_table(path: Path, key: str) -> pd.DataFrame:
    """Read a user's table by extension: ``.csv``, ``.tsv``/``.tab`` or ``.parquet``/``.pq``.
    CSV/TSV columns are all ``string`` (strict, see :func:`read_delimited`); parquet keeps its
    types. The index is the 1-based line (text) or row (parquet) of each row."""
    path = require_file(path, key)
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        if path.stat().st_size == 0:
            return pd.DataFrame()
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # a corrupt file: nothing to hand on to validate
            raise StageError(f"{path}: not a readable parquet file (params: {key}): {exc}") from exc
        df.index = pd.RangeIndex(1, len(df) + 1, name=schema.SOURCE_LINE)
        return df
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


def finalize_items(cols: dict[str, pd.Series], lines: pd.Index | None = None) -> pd.DataFrame:
    """Canonical column order (``ITEM_COLUMNS`` present, then extras) and dtypes.

    ``cols`` maps column name -> Series (all the same length, taken by position); ``genres``
    must already hold lists. Canonical columns not in ``cols`` are left out (validate reports
    them). ``lines``: the source line of each row, kept as the index (else a RangeIndex).
    """
    order = [c for c in schema.ITEM_COLUMNS if c in cols] + \
            [c for c in cols if c not in schema.ITEM_COLUMNS]
    out = {}
    for c in order:
        s = cols[c] if c == schema.GENRES else to_str(cols[c])
        out[c] = s.reset_index(drop=True)
    df = pd.DataFrame(out, columns=order)
    return _with_lines(df, lines)


def _with_lines(df: pd.DataFrame, lines: pd.Index | np.ndarray | None) -> pd.DataFrame:
    if lines is None:
        return df.reset_index(drop=True)
    df.index = pd.Index(np.asarray(lines, dtype=np.int64), name=schema.SOURCE_LINE)
    return df


def finalize_interactions(cols: dict[str, pd.Series],
                          lines: pd.Index | np.ndarray | None = None) -> pd.DataFrame:
    """Canonical column order and :data:`schema.INTERACTION_DTYPES` for the columns present.

    ``timestamp`` must be Int64 seconds: it is ``int64`` when it has no nulls, else it stays
    nullable ``Int64`` (validate reports the null rows). ``lines``: as in
    :func:`finalize_items`.
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
    return _with_lines(pd.DataFrame(out, columns=list(out)), lines)


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
    #: params -> how the item text the encoder reads is built (stated in the log and report)
    text_template: Callable[[IngestParams], str]


from genre_tasks.data.adapters import mind, movielens, tabular  # noqa: E402  (use helpers above)

ADAPTERS: dict[str, Adapter] = {
    "movielens-100k": Adapter("movielens-100k", movielens.files, movielens.read,
                              lambda p: movielens.TEXT_TEMPLATE),
    "mind": Adapter("mind", mind.files, mind.read, lambda p: mind.TEXT_TEMPLATE),
    "tabular": Adapter("tabular", tabular.files, tabular.read, tabular.text_template),
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
         slice_users: bool = True, locations: bool = False, report: dict | None = None,
         until: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read ``source_dir`` with adapter ``p.adapter``, append the feedback store, then slice:
    ``p.until`` (base interactions only) and ``p.max_users`` (:func:`slice_view`).

    Returns ``(items, interactions)`` in the canonical schema (see module docstring); all items
    are kept when ``max_users`` slices the users. ``feedback=False`` leaves the store parts out
    (the base data only); ``slice_users=False`` keeps every user (the whole store);
    ``until=False`` keeps the base rows after ``ingest.until`` too. ``locations``: keep the
    columns :data:`schema.SOURCE_FILE` / :data:`schema.SOURCE_LINE` saying where each row is
    in the user's files (a feedback part: its parquet file and 1-based row). ``report``: filled
    with what the slicing kept and dropped. Refuses a malformed file with :class:`InputError`.
    """
    adapter = get(p.adapter)
    source_dir = Path(source_dir)
    files = adapter.files(p, source_dir)
    for path, key in files:
        require_file(path, key)
    items, interactions = adapter.read(p, source_dir)
    report = {} if report is None else report
    items = apply_conventions(p, adapter, items, report)
    items = _locate(items, files[0][0])
    interactions = _locate(interactions, files[1][0])
    if feedback:
        extra, parts = read_store(source_dir, locations=True)
        if parts:
            interactions = append_interactions(interactions, extra)
            log.info("feedback store: %d batch(es) added %d interaction(s) (%s .. %s)", len(parts),
                     len(extra), parts[0]["batch_id"], parts[-1]["batch_id"])
    interactions = slice_view(p, interactions, report, source_dir, users=slice_users,
                              until=until)
    if not locations:
        items = items.drop(columns=[schema.SOURCE_FILE, schema.SOURCE_LINE])
        interactions = interactions.drop(columns=[schema.SOURCE_FILE, schema.SOURCE_LINE],
                                         errors="ignore")
    return items, interactions


def slice_view(p: IngestParams, interactions: pd.DataFrame, report: dict,
               source_dir: str | Path, *, users: bool = True, until: bool = True
               ) -> pd.DataFrame:
    """The slice of ``interactions`` (with location columns) the pipeline uses: base rows
    before ``ingest.until`` (feedback-store rows are never cut) then the ``ingest.max_users``
    users with the smallest ids. ``report`` gets ``{until, max_users, rows_in, rows_kept,
    rows_dropped, dropped_by_until, dropped_by_max_users, users_in, users_kept}``."""
    n_in = len(interactions)
    has_users = schema.USER_ID in interactions.columns
    users_in = int(interactions[schema.USER_ID].nunique()) if has_users else 0
    cut = p.until_timestamp() if until and hasattr(p, "until_timestamp") else None
    out = interactions
    if cut is not None and schema.TIMESTAMP in out.columns:
        prefix = str(store_dir(source_dir)) + "/"
        files = out[schema.SOURCE_FILE].astype(object) if schema.SOURCE_FILE in out.columns \
            else pd.Series([None] * len(out))
        base = np.array([not (isinstance(f, str) and f.startswith(prefix)) for f in files], bool)
        late = out[schema.TIMESTAMP].ge(cut).fillna(False).to_numpy(dtype=bool) & base
        out = out[~late].reset_index(drop=True)
        log.info("ingest.until %s: kept %d of %d base interaction(s)", p.until,
                 int(base.sum() - late.sum()), int(base.sum()))
    n_mid = len(out)
    if users:
        out = keep_first_users(out, p.max_users)
    report.update({
        "until": p.until if until else None, "max_users": p.max_users if users else None,
        "rows_in": n_in, "rows_kept": len(out), "rows_dropped": n_in - len(out),
        "dropped_by_until": n_in - n_mid, "dropped_by_max_users": n_mid - len(out),
        "users_in": users_in,
        "users_kept": int(out[schema.USER_ID].nunique()) if has_users else 0,
    })
    if report["rows_dropped"]:
        log.info("slicing (ingest.until=%s, ingest.max_users=%s): kept %d of %d interaction(s), "
                 "dropped %d (%d by until, %d by max_users); %d of %d user(s)", report["until"],
                 report["max_users"], len(out), n_in, report["rows_dropped"],
                 report["dropped_by_until"], report["dropped_by_max_users"],
                 report["users_kept"], users_in)
    return out


def apply_conventions(p: IngestParams, adapter: Adapter, items: pd.DataFrame,
                      report: dict) -> pd.DataFrame:
    """Dataset conventions (``ingest.no_genre_tokens``; the text template).

    * a genre equal (case-insensitively, stripped) to one of ``ingest.no_genre_tokens``, e.g.
      MovieLens' ``(no genres listed)``, is a placeholder for "no genre": it is removed;
    * the item text template is logged, and a WARNING says when the text of most items is
      only their title (the encoder then knows nothing else about them).

    ``report`` gets ``placeholder_genre_items`` and ``text`` = ``{template, items,
    title_only_items}``.
    """
    tokens = {t.strip().casefold() for t in getattr(p, "no_genre_tokens", ()) or ()}
    n_placeholder = 0
    if tokens and schema.GENRES in items.columns:
        def strip(genres: object) -> object:
            nonlocal n_placeholder
            if not isinstance(genres, list):
                return genres
            kept = [g for g in genres if not (isinstance(g, str) and g.strip().casefold() in tokens)]
            n_placeholder += len(kept) != len(genres)
            return kept

        items = items.assign(**{schema.GENRES: items[schema.GENRES].map(strip)})
        if n_placeholder:
            log.info("%d item(s) had only a placeholder genre %s (ingest.no_genre_tokens): "
                     "they have no genre now (the genre stage fills it in)", n_placeholder,
                     sorted(getattr(p, "no_genre_tokens", ())))
    template = adapter.text_template(p)
    title_only = 0
    if schema.TEXT in items.columns and schema.TITLE in items.columns and len(items):
        text = items[schema.TEXT].astype("string").str.strip().str.rstrip(".")
        title = items[schema.TITLE].astype("string").str.strip().str.rstrip(".")
        title_only = int((text == title).fillna(False).sum())
    log.info("item text (what the encoder reads): %s", template)
    if len(items) and title_only * 2 > len(items):
        log.warning("the item text is only the title for %d of %d item(s) (template: %s): the "
                    "encoder learns nothing else about them; add descriptive columns (e.g. "
                    "ingest.tabular.text_fields: [title, genres, description])", title_only,
                    len(items), template)
    report["placeholder_genre_items"] = n_placeholder
    report["text"] = {"template": template, "items": int(len(items)),
                      "title_only_items": title_only}
    return items


def _locate(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The adapter's index (source lines) -> columns SOURCE_FILE / SOURCE_LINE."""
    lines = (df.index.to_numpy(dtype=np.int64) if df.index.name == schema.SOURCE_LINE
             else np.arange(1, len(df) + 1, dtype=np.int64))
    out = df.reset_index(drop=True)
    out[schema.SOURCE_FILE] = pd.Series([str(path)] * len(out), dtype="string")
    out[schema.SOURCE_LINE] = lines
    return out


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


def read_store(source_dir: str | Path, verify: bool = True,
               locations: bool = False) -> tuple[pd.DataFrame, list[dict]]:
    """The applied parts of the feedback store, concatenated in batch-id order.

    Returns ``(interactions, parts)``: canonical interactions and ``[{batch_id, rows, path}]``.
    Only ledger-listed parts count (a part without a ledger entry is an interrupted apply: it is
    ignored with a warning). A listed part that is missing or whose content differs from the
    ledger (``verify``) raises StageError. ``locations``: add SOURCE_FILE (the part's path) and
    SOURCE_LINE (its 1-based row).
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
        frames.append(_locate(df, path) if locations else df)
        parts.append({"batch_id": batch_id, "rows": int(len(df)), "path": str(path)})
    if not frames:
        return empty_interactions(), parts
    return pd.concat(frames, ignore_index=True), parts
