"""Running the planned suites with Great Expectations, and the report of their results.

:func:`run_suites` runs :mod:`genre_tasks.data.expectations`' plans in one ephemeral GX context
(and builds Data Docs); :func:`build_report` turns the GX results into the JSON-able report of
``summary.json`` / ``failure.json`` (per table: success, expectation counts, rows, each
expectation with its result and, when failed, sample rows with their source file and line);
:func:`format_failure` is the message of :class:`~genre_tasks.errors.DataValidationError`
and :func:`_log_report` the summary in the stage log.

``great_expectations`` is imported inside functions: importing it takes ~3 s.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from genre_tasks import logs
from genre_tasks.data.expectations import ITEM_EXISTS, REPLACEMENT_CHAR, Check, SuitePlan
from genre_tasks.data.validate_params import STAGE, ValidateParams
from genre_tasks.schema import SOURCE_FILE, SOURCE_LINE, TIMESTAMP

#: GX result statistics summed per table and over the run
COUNTS = ("evaluated_expectations", "successful_expectations", "unsuccessful_expectations")
DOCS_SITE = "validate"
#: Longest string shown for a value in messages (the rest is cut with an ellipsis).
MAX_VALUE_CHARS = 80


def run_suites(plans: list[SuitePlan], p: ValidateParams,
               docs_dir: Path | None = None) -> dict[str, Any]:
    """Run each plan's suite in one ephemeral GX context; return ``{suite name: GX result}``.

    When ``docs_dir`` is given and every suite passed, Data Docs (index.html, suite and
    validation pages) are built into it.
    """
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # this GX module sets its own logger to INFO at import (one line per ephemeral context)
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = ctx.data_sources.add_pandas("raw")
    run_id = RunIdentifier(run_name=STAGE)
    # quarantine needs every offending row (COMPLETE); reject only the samples (SUMMARY)
    result_format = {"result_format": "COMPLETE" if p.on_bad_rows == "quarantine" else "SUMMARY",
                     "partial_unexpected_count": p.sample_rows}
    results: dict[str, Any] = {}
    for plan in plans:
        asset = source.add_dataframe_asset(plan.name)
        batch = asset.add_batch_definition_whole_dataframe(plan.name)
        suite = ctx.suites.add(gx.ExpectationSuite(
            name=plan.name, expectations=[c.expectation for c in plan.checks],
            meta={"table": plan.table}))
        definition = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=plan.name, data=batch, suite=suite))
        results[plan.name] = definition.run(batch_parameters={"dataframe": plan.frame},
                                            result_format=result_format, run_id=run_id)
    if docs_dir is not None and (all(r.success for r in results.values())
                                 or p.on_bad_rows == "quarantine"):
        ctx.add_data_docs_site(DOCS_SITE, {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(Path(docs_dir).resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        ctx.build_data_docs(site_names=[DOCS_SITE])
    return results


def build_report(tables: dict[str, dict], plans: list[SuitePlan], results: dict[str, Any],
                 p: ValidateParams) -> dict:
    """JSON-able report: per table success, counts, rows and every expectation's outcome.

    ``tables`` maps table name -> ``{"path": str, "frame": DataFrame}`` (the normalized raw
    table whose row numbers samples refer to). Failed expectations carry ``samples``.
    """
    report: dict[str, Any] = {"tables": {}}
    for name, info in tables.items():
        frame = info["frame"]
        entry: dict[str, Any] = {
            "path": info["path"], "rows": int(len(frame)),
            "columns": [str(c) for c in frame.columns],
            "evaluated_expectations": 0, "successful_expectations": 0,
            "unsuccessful_expectations": 0, "expectations": [], "skipped": [],
        }
        if info.get("lines") is not None:
            entry["source_files"] = sorted(set(info["lines"][SOURCE_FILE].dropna().astype(str)))
        for plan in (pl for pl in plans if pl.table == name):
            result = results[plan.name]
            stats = result.statistics
            for k in COUNTS:
                entry[k] += int(stats[k])
            by_key = {r.expectation_config.meta.get("check"): r for r in result.results}
            for check in plan.checks:
                entry["expectations"].append(
                    _expectation_entry(plan, check, by_key[check.key], frame, p.sample_rows,
                                       info.get("lines")))
            entry["skipped"].extend(plan.skipped)
        entry["success"] = all(e["success"] for e in entry["expectations"])
        report["tables"][name] = entry
    report["success"] = all(t["success"] for t in report["tables"].values())
    for k in COUNTS[:2]:
        report[k] = sum(t[k] for t in report["tables"].values())
    report["params"] = _jsonable(dataclasses.asdict(p))
    return report


def add_failure(report: dict, rule: str, detail: str) -> dict:
    """Append a failed batch-level rule to a GX report (e.g. found at apply time, or a whole-table rule)."""
    table = report["tables"]["interactions"]
    table["expectations"].append({"suite": "batch", "rule": rule, "column": None,
                                  "expectation": "batch_rule", "kwargs": {}, "success": False,
                                  "unit": "rows", "error": detail})
    table["evaluated_expectations"] += 1
    table["unsuccessful_expectations"] += 1
    table["success"] = report["success"] = False
    return report


def _expectation_entry(plan: SuitePlan, check: Check, result: Any, frame: pd.DataFrame,
                       sample_rows: int, lines: pd.DataFrame | None = None) -> dict:
    config_ = result.expectation_config
    res = dict(result.result or {})
    entry: dict[str, Any] = {
        "suite": plan.name,
        "rule": check.rule,
        "column": ", ".join(check.columns) or None,
        "expectation": config_.type,
        "kwargs": _jsonable({k: v for k, v in config_.kwargs.items() if k != "batch_id"}),
        "success": bool(result.success),
        "unit": plan.unit,
    }
    for k in ("observed_value", "element_count", "unexpected_count", "missing_count"):
        if k in res:
            entry[k] = _jsonable(res[k])
    if not result.success and res.get("unexpected_index_list") is not None:
        entry["bad_rows"] = sorted({int(r) for r in res["unexpected_index_list"]})  # COMPLETE
    error = _exception_message(result.exception_info)
    if error:
        entry["error"] = error
    if not result.success:
        # distinct unexpected values among the first ``sample_rows`` offending rows (the
        # derived True/False column of the item_id rule says nothing: its samples show item_id)
        if res.get("partial_unexpected_list") and config_.kwargs.get("column") != ITEM_EXISTS:
            values = [_jsonable(v) for v in res["partial_unexpected_list"]]
            entry["unexpected_values"] = [v for i, v in enumerate(values) if v not in values[:i]]
        rows = list(dict.fromkeys(res.get("partial_unexpected_index_list") or []))[:sample_rows]
        show = [c for c in (*plan.context_columns, *check.columns) if c in frame.columns]
        show = list(dict.fromkeys(show))
        entry["samples"] = [
            {"row": int(r), "values": {c: _jsonable(frame.at[r, c]) for c in show},
             **({"source": _source(lines, int(r))} if lines is not None else {})}
            for r in rows if r in frame.index
        ]
    return entry


def _source(lines: pd.DataFrame, row: int) -> dict | None:
    """``{"file", "line"}`` of raw row ``row`` in the user's files (None when unknown)."""
    if row < 0 or row >= len(lines):
        return None
    file, line = lines.iat[row, 0], lines.iat[row, 1]
    if file is None or file is pd.NA or pd.isna(line):
        return None
    unit = "row" if str(file).lower().endswith((".parquet", ".pq")) else "line"
    return {"file": str(file), "line": int(line), "unit": unit}


def table_lines(lines: pd.DataFrame | None, table: str, n_rows: int) -> pd.DataFrame | None:
    """The part of ingest's side table for ``table``: row -> (source_file, source_line)
    (None when there is none, or it does not match the table's length)."""
    if lines is None or not len(lines):
        return None
    part = lines[lines["table"] == table].sort_values("row")
    if len(part) != n_rows:
        return None
    return part[[SOURCE_FILE, SOURCE_LINE]].reset_index(drop=True)


def _exception_message(info: Any) -> str | None:
    """First exception message in GX ``exception_info`` (flat, or keyed by metric id)."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "exception")
    for value in info.values():
        msg = _exception_message(value)
        if msg:
            return msg
    return None


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays, pandas NA/NaN -> None, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str):
        return _jsonable(value.tolist())
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "item"):
        return _jsonable(value.item())
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def _show(value: Any, column: str = "") -> str:
    """Short printable form of a sample value; U+FFFD is spelled out, timestamps get a date."""
    if column == TIMESTAMP and isinstance(value, int) and not isinstance(value, bool):
        try:
            when = dt.datetime.fromtimestamp(value, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        except (OverflowError, OSError, ValueError):
            when = "out of range"
        return f"{value} ({when} UTC)"
    if isinstance(value, str):
        text = value if len(value) <= MAX_VALUE_CHARS else value[:MAX_VALUE_CHARS] + "..."
        return repr(text).replace(REPLACEMENT_CHAR, "\\ufffd")
    return repr(value)


def format_failure(report: dict) -> str:
    """Human-readable failure message: per table (and file) each broken rule with samples."""
    failed = [e for t in report["tables"].values() for e in t["expectations"] if not e["success"]]
    samples = [s for e in failed for s in e.get("samples", [])]
    located = all(s.get("source") for s in samples)
    lines = [f"data validation failed: {len(failed)} expectation(s) broken "
             + ("(each row: your file and its 1-based line, or row of a parquet file)" if located
                else "(row = 0-based row number in the file)")]
    for name, table in report["tables"].items():
        bad = [e for e in table["expectations"] if not e["success"]]
        if table.get("source_files"):
            head = (f"table {name} (from {', '.join(table['source_files'])}; {table['rows']} rows,"
                    f" checked as {table['path']})")
        else:
            head = f"table {name} ({table['path']}, {table['rows']} rows)"
        if not bad:
            lines.append(f"{head}: all {table['evaluated_expectations']} expectations passed")
            continue
        lines.append(f"{head}: {len(bad)} of {table['evaluated_expectations']} expectations failed")
        for e in bad:
            where = f"column {e['column']}" if e["column"] else "table"
            lines.append(f"  - FAILED {where}: {e['rule']} [{e['expectation']}]")
            if e.get("error") and e["expectation"] == "batch_rule":
                lines += [f"      {line.strip()}" for line in e["error"].splitlines()]
            elif e.get("error"):
                lines.append(f"      could not be evaluated: {e['error']}")
            if "unexpected_count" in e:
                total = e.get("element_count", "?")
                lines.append(f"      {e['unexpected_count']} unexpected of {total} {e['unit']}")
            elif "observed_value" in e:
                lines.append(f"      observed: {e['observed_value']!r}")
            elif e["expectation"] == "expect_column_to_exist":
                have = ", ".join(table["columns"]) or "(none)"
                lines.append(f"      column missing; table columns: {have}")
            if any(v is not None for v in e.get("unexpected_values", [])):
                vals = ", ".join(_show(v) for v in e["unexpected_values"])
                lines.append(f"      unexpected values (sample): {vals}")
            for s in e.get("samples", []):
                vals = ", ".join(f"{k}={_show(v, k)}" for k, v in s["values"].items())
                src = s.get("source")
                where = (f"{src['file']} {src['unit']} {src['line']}" if src
                         else f"row {s['row']}")
                lines.append(f"      {where}: {vals}")
        for s in table["skipped"]:
            lines.append(f"  - skipped: {s['rule']}"
                         + (f" (column {s['column']})" if s["column"] else "") + f": {s['reason']}")
    if report.get("failure_report"):
        lines.append(f"full report: {report['failure_report']}")
    return "\n".join(lines)


def _log_report(report: dict, log: logs.StageLog) -> None:
    """The GX summary, one line per expectation (visible in the Airflow task log)."""
    for name, table in report["tables"].items():
        log.logger.info("GX %s (%s, %d rows): %d/%d expectations passed%s", name, table["path"],
                        table["rows"], table["successful_expectations"],
                        table["evaluated_expectations"],
                        f", {len(table['skipped'])} skipped" if table["skipped"] else "")
        for e in table["expectations"]:
            detail = ""
            if not e["success"]:
                if "unexpected_count" in e:
                    detail = (f": {e['unexpected_count']} unexpected of "
                              f"{e.get('element_count')} {e['unit']}")
                elif "observed_value" in e:
                    detail = f": observed {e['observed_value']!r}"
                if e.get("error"):
                    detail += f" (error: {e['error']})"
            log.logger.log(logging.INFO if e["success"] else logging.ERROR,
                           "  %s %s | %s | %s [%s]%s", "ok  " if e["success"] else "FAIL", name,
                           e["column"] or "table", e["rule"], e["expectation"], detail)
