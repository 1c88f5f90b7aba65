"""``validate.on_bad_rows: quarantine``: the rows breaking row-level rules set aside.

:func:`quarantine` turns a failed report into ``data/validation/quarantine.csv`` (rows, reasons,
source file and line) when the bad rows are few enough, and records in the report the rows of
``data/raw/*.parquet`` that preprocess leaves out (:func:`drop_quarantined`). Rows ingest left
out because a value did not parse (``data/raw/unparsed.parquet``) count as bad rows too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from genre_tasks import io
from genre_tasks.data.gx_report import _jsonable, _source, add_failure
from genre_tasks.data.validate_params import ValidateParams
from genre_tasks.schema import (
    IMPRESSION_ID,
    ITEM_ID,
    LABEL,
    RATING,
    TIMESTAMP,
    TITLE,
    USER_ID,
    Paths,
)


def quarantine_path(paths: Paths) -> Path:
    """The bad-rows report of ``validate.on_bad_rows: quarantine`` (rows, reasons, source).
    A DVC output of validate: written on every pass (header only when nothing was set aside),
    so a run whose validate DVC restores from its run cache still has it."""
    return paths.validation_dir / "quarantine.csv"


#: the first columns of quarantine.csv (then the row's key values)
QUARANTINE_COLUMNS = ["table", "row", "source_file", "source_line", "reasons"]


def bad_rows(report: dict) -> dict[str, dict[int, list[str]]] | None:
    """``{table: {row: [reasons]}}`` of the broken row-level rules (and pops the full row
    lists out of the report); None when a broken rule is about a whole table (a missing
    column, a dtype, the row count...), which no quarantine can fix."""
    out: dict[str, dict[int, list[str]]] = {name: {} for name in report["tables"]}
    whole_table = False
    for name, table in report["tables"].items():
        for e in table["expectations"]:
            rows = e.pop("bad_rows", None)
            if e["success"]:
                continue
            if rows is None:
                whole_table = True
                continue
            for r in rows:
                out[name].setdefault(r, []).append(f"{e['column'] or 'table'}: {e['rule']}")
    return None if whole_table else out


UNPARSED_RULE = "every value parses (a time, a number, a label)"


def unparsed_failure(unparsed: pd.DataFrame) -> str:
    """The detail of the failure for rows ingest left out because a value did not parse."""
    shown = [f"{r.source_file} line {r.source_line}, column {r.column}: {r.value} - rule: "
             f"{r.rule}" for r in unparsed.head(10).itertuples()]
    more = f"; ... and {len(unparsed) - 10} more" if len(unparsed) > 10 else ""
    return (f"{len(unparsed)} value(s) do not parse (ingest left their rows out under "
            f"validate.on_bad_rows: quarantine): " + "; ".join(shown) + more)


def quarantine(report: dict, p: ValidateParams, frames: dict[str, pd.DataFrame],
               lines: dict[str, pd.DataFrame | None], kept: np.ndarray | None,
               target: Path, root: Path, unparsed: pd.DataFrame | None = None) -> bool:
    """Apply ``on_bad_rows: quarantine`` to a failed report; True when the rest may proceed.

    Interactions whose item is quarantined are quarantined too. Over
    ``max_bad_rows_fraction`` of a table, or a whole-table rule broken: False (reject; the
    report then says why). Else the bad rows go to ``target`` (CSV: table, row, source file
    and line, reasons, the row's key values) and ``report["quarantine"]`` lists the rows of
    data/raw/{items,interactions}.parquet that preprocess drops (``kept`` maps validated
    interaction rows to rows of the slice, -1 = not in it).

    ``unparsed`` (ingest's ``data/raw/unparsed.parquet``): source rows whose value did not
    parse, already left out of the raw tables; they count as bad rows of their table (also for
    ``max_bad_rows_fraction``, over the table's rows + them) and are listed in ``target``
    (no raw ``row``; their file, line, column, raw value and rule).
    """
    bad = bad_rows(report)
    if bad is None:
        report["quarantine"] = {"policy": "quarantine", "applied": False,
                                "reason": "a whole-table rule is broken"}
        return False
    items, inter = frames["items"], frames["interactions"]
    if bad["items"] and ITEM_ID in items.columns and ITEM_ID in inter.columns:
        gone = set(items[ITEM_ID].iloc[sorted(bad["items"])].dropna())
        for r in np.flatnonzero(inter[ITEM_ID].isin(gone).to_numpy(dtype=bool)):
            bad["interactions"].setdefault(int(r), []).append("item_id: its item is quarantined")
    if unparsed is None:
        unparsed = pd.DataFrame(columns=["table", "source_file", "source_line", "column",
                                         "value", "rule"])
    n_unparsed = {name: int(len(unparsed[unparsed["table"] == name]
                                .drop_duplicates(["source_file", "source_line"])))
                  for name in bad}
    over = {name: (len(rows) + n_unparsed[name], len(frames[name]) + n_unparsed[name])
            for name, rows in bad.items()
            if len(frames[name]) + n_unparsed[name] and len(rows) + n_unparsed[name] >
            p.max_bad_rows_fraction * (len(frames[name]) + n_unparsed[name])}
    counts = {name: len(rows) + n_unparsed[name] for name, rows in bad.items()}
    if over:
        for name, (n, total) in over.items():
            add_failure(report, f"bad rows are at most validate.max_bad_rows_fraction "
                        f"({p.max_bad_rows_fraction:.2%}) of a table (on_bad_rows: quarantine)",
                        f"table {name}: {n} of {total} rows ({n / total:.2%}) break a rule")
        report["quarantine"] = {"policy": "quarantine", "applied": False, "bad_rows": counts,
                                "unparsed_rows": n_unparsed,
                                "reason": "over max_bad_rows_fraction"}
        return False
    records = []
    for (name, file, line), group in unparsed.groupby(["table", "source_file", "source_line"],
                                                     sort=True):
        records.append({"table": name, "row": None, "source_file": file,
                        "source_line": int(line),
                        "reasons": "; ".join(f"{g.column}: {g.rule} (raw value {g.value}; the "
                                             f"row was not read)" for g in group.itertuples())})
    for name, rows in bad.items():
        frame, src = frames[name], lines.get(name)
        show = [c for c in (ITEM_ID, TITLE, USER_ID, TIMESTAMP, RATING, LABEL, IMPRESSION_ID)
                if c in frame.columns and (name == "interactions" or c in (ITEM_ID, TITLE))]
        for r in sorted(rows):
            where = _source(src, r) if src is not None else None
            records.append({"table": name, "row": r,
                            "source_file": where["file"] if where else None,
                            "source_line": where["line"] if where else None,
                            "reasons": "; ".join(dict.fromkeys(rows[r])),
                            **{c: _jsonable(frame.at[r, c]) for c in show}})
    with io.atomic_path(target) as tmp:
        pd.DataFrame(records, dtype=object).to_csv(tmp, index=False)  # ints stay ints
    inter_rows = sorted(bad["interactions"])
    if kept is not None:
        inter_rows = sorted(int(kept[r]) for r in inter_rows if kept[r] >= 0)
    report["quarantine"] = {"policy": "quarantine", "applied": True, "bad_rows": counts,
                            "unparsed_rows": n_unparsed,
                            "file": io.rel_path(target, root), "items_rows": sorted(bad["items"]),
                            "interactions_rows": inter_rows}
    report["success"] = True
    return True



def drop_quarantined(summary: dict, items: pd.DataFrame,
                     interactions: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The raw tables without the rows validation quarantined (``summary.json``'s
    ``quarantine``; row numbers of data/raw/{items,interactions}.parquet)."""
    q = summary.get("quarantine") or {}
    if not q.get("applied"):
        return items, interactions
    items = items.drop(index=items.index[q["items_rows"]]).reset_index(drop=True)
    interactions = interactions.drop(
        index=interactions.index[q["interactions_rows"]]).reset_index(drop=True)
    return items, interactions
