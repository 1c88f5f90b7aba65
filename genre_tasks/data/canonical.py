"""Canonical frames: value parsers (ids, floats, labels, timestamps) and the canonical items /
interactions tables every adapter and the interaction store produce."""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd

from genre_tasks import schema

log = logging.getLogger("genre.ingest")
_EPOCH = pd.Timestamp(0, tz="UTC")
_INT64_MAX = float(2**63 - 1024)  # largest float64 safely below the int64 limit


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


