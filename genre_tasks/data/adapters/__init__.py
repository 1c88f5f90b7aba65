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

import contextlib
import contextvars
import csv
import io as io_module
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from genre_tasks import schema
from genre_tasks.errors import StageError

if TYPE_CHECKING:
    from genre_tasks.data.adapters.params import IngestParams

log = logging.getLogger("genre.ingest")



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


#: set by :func:`collecting_bad_rows` (``validate.on_bad_rows: quarantine``): the row-level
#: value problems of every file read go here instead of refusing the file
_BAD_ROWS: contextvars.ContextVar[list[Problem] | None] = contextvars.ContextVar(
    "genre_bad_rows", default=None)


@contextlib.contextmanager
def collecting_bad_rows() -> Iterator[list[Problem]]:
    """Within this block, a row whose VALUE does not parse (a rating ``five``, a bad time, a
    bad label or impression entry) does not refuse its file: the row is left out of the
    adapter's tables and its problem (file, 1-based line, column, raw value, rule) is appended
    to the yielded list, for validate's bad-rows policy (``validate.on_bad_rows: quarantine``).
    File-level faults (unreadable file, invalid UTF-8, a row with the wrong number of fields,
    a duplicate header, broken quoting) are still refused."""
    collected: list[Problem] = []
    token = _BAD_ROWS.set(collected)
    try:
        yield collected
    finally:
        _BAD_ROWS.reset(token)


class Problems:
    """Collects the problems of one file; :meth:`raise_if_any` refuses it; :meth:`settle`
    refuses it too, or (in :func:`collecting_bad_rows`) hands its row problems on."""

    def __init__(self, file: str | Path) -> None:
        self.file = str(file)
        self.items: list[Problem] = []
        self.total = 0
        #: keep every problem (the bad rows are dropped, so each must be known)
        self.collect_all = _BAD_ROWS.get() is not None

    def add(self, line: int | None, column: str | None, value: object, rule: str) -> None:
        self.total += 1
        if self.collect_all or len(self.items) < MAX_PROBLEMS:
            self.items.append(Problem(self.file, None if line is None else int(line), column,
                                      value, rule))

    def unparsed(self, raw: pd.Series, parsed: pd.Series, column: str, rule: str) -> None:
        """Refuse values that are present in ``raw`` but null after parsing (``raw``'s index
        is the 1-based line of each row)."""
        text = _strip(to_str(raw))
        bad = (text.notna() & (text != "")).to_numpy(dtype=bool) & \
            parsed.isna().to_numpy(dtype=bool)
        cap = None if self.collect_all else MAX_PROBLEMS
        for line, value in zip(raw.index[bad][:cap], raw[bad].iloc[:cap]):
            self.add(line, column, value, rule)
        if cap is not None:
            self.total += max(0, int(bad.sum()) - MAX_PROBLEMS)

    def raise_if_any(self) -> None:
        if self.total:
            raise InputError(self.file, self.items, self.total)

    def settle(self) -> set[int]:
        """Row-level value problems: refuse the file (:meth:`raise_if_any`), or, inside
        :func:`collecting_bad_rows`, record them there and return the 1-based lines to leave
        out (a problem without a line still refuses the file)."""
        sink = _BAD_ROWS.get()
        if sink is None or any(p.line is None for p in self.items) or \
                len(self.items) != self.total:
            self.raise_if_any()
            return set()
        sink.extend(self.items)
        return {int(p.line) for p in self.items if p.line is not None}


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


# --------------------------------------------------------------------------- canonical frames
from genre_tasks.data.canonical import (  # noqa: E402  (re-exported: the adapters' helpers)
    to_str,
    _isna,
    to_float,
    to_label,
    to_timestamp,
    _parse_datetimes,
    _datetime_seconds,
    _strip,
    split_list,
    join_text,
    empty_items,
    empty_interactions,
    finalize_items,
    _with_lines,
    finalize_interactions,
    null_column,
)


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
         until: bool = True, exclude: Sequence[str] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read ``source_dir`` with adapter ``p.adapter``, append the feedback store, then slice:
    ``p.until`` (base interactions only) and ``p.max_users`` (:func:`slice_view`).

    Returns ``(items, interactions)`` in the canonical schema (see module docstring); all items
    are kept when ``max_users`` slices the users. ``feedback=False`` leaves the store parts out
    (the base data only); ``slice_users=False`` keeps every user (the whole store);
    ``until=False`` keeps the base rows after ``ingest.until`` too. ``locations``: keep the
    columns :data:`schema.SOURCE_FILE` / :data:`schema.SOURCE_LINE` saying where each row is
    in the user's files (a feedback part: its parquet file and 1-based row). ``exclude``: store
    batches left out (:func:`read_store`). ``report``: filled
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
        extra, parts = read_store(source_dir, locations=True, exclude=exclude)
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


# --------------------------------------------------------------------------- the interaction store
from genre_tasks.data.store import (  # noqa: E402  (re-exported for the adapters' callers)
    STORE_DIR,
    LEDGER_FILE,
    BATCH_ID_PATTERN,
    store_dir,
    ledger_path,
    part_path,
    read_ledger,
    canonical_interactions,
    content_hash,
    read_part,
    read_store,
    _locate,
)
