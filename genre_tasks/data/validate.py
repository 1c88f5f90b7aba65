"""Validate stage: Great Expectations suites over the raw ``items`` and ``interactions`` tables.

The ingest adapters are lenient (an empty file gives an empty table, a missing source column a
missing canonical column, a bad number a null, a non-UTF-8 byte the U+FFFD character), so this
stage is where bad data is rejected. Three GX 1.x suites run in one ephemeral context.

On success it writes ``data/validation/summary.json`` (per table: success, expectation counts,
rows, each expectation with its result), Data Docs HTML in ``data/validation/docs/`` and
``metrics/validate.json``. On failure it writes none of them (a stale ``summary.json`` is
removed at the start, so preprocess cannot run on it), writes ``data/validation/failure.json``
and raises :class:`~genre_tasks.errors.DataValidationError` whose message names the table, the
file, each broken rule with its column, the unexpected count and sample rows (0-based row
numbers of the raw table) with their values.

This module is the stage (read the raw tables, validate, write the outputs); the parts:

``validate_params.py``  the ``validate`` section of params.yaml (:class:`ValidateParams`)
``expectations.py``     the suites: which rules each table must pass
``gx_report.py``        running the suites with GX; the report, the failure message, the log
``quarantine.py``       ``on_bad_rows: quarantine``: bad rows set aside, the rest proceeds
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from genre_tasks import config, io, logs
from genre_tasks.data.expectations import normalize, plan_interactions, plan_items
from genre_tasks.data.gx_report import (
    _log_report,
    add_failure,
    build_report,
    format_failure,
    run_suites,
    table_lines,
)
from genre_tasks.data.quarantine import (
    QUARANTINE_COLUMNS,
    UNPARSED_RULE,
    quarantine,
    quarantine_path,
    unparsed_failure,
)
from genre_tasks.data.validate_params import STAGE, ValidateParams
from genre_tasks.errors import DataValidationError, StageError
from genre_tasks.schema import IMPRESSION_ID, ITEM_ID, TEXT, TITLE, USER_ID, Paths


def validate_tables(items: pd.DataFrame, interactions: pd.DataFrame, p: ValidateParams, *,
                    items_path: str = "items", interactions_path: str = "interactions",
                    docs_dir: Path | None = None, lines: pd.DataFrame | None = None) -> dict:
    """Validate two raw tables (canonical schema); return the report (never raises on bad data).

    ``report["success"]`` says whether every expectation passed; Data Docs are built into
    ``docs_dir`` only then. Row numbers in samples are positions in the given frames; with
    ``lines`` (ingest's side table) each sample also names its source file and line.
    """
    items = normalize(items, (ITEM_ID, TITLE, TEXT))
    interactions = normalize(interactions, (USER_ID, ITEM_ID, IMPRESSION_ID))
    item_ids = items[ITEM_ID] if ITEM_ID in items.columns else None
    plans = plan_items(items, p) + plan_interactions(interactions, item_ids, p)
    results = run_suites(plans, p, docs_dir)
    tables = {"items": {"path": items_path, "frame": items,
                        "lines": table_lines(lines, "items", len(items))},
              "interactions": {"path": interactions_path, "frame": interactions,
                               "lines": table_lines(lines, "interactions", len(interactions))}}
    return build_report(tables, plans, results, p)


def failure_path(paths: Paths) -> Path:
    """Where the failure report of the last failed validation goes (not a DVC out)."""
    return paths.validation_dir / "failure.json"


def docs_path(paths: Paths) -> Path:
    """Data Docs site (index.html) of the last successful validation."""
    return paths.validation_dir / "docs"


def _read(path: Path, table: str, root: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataValidationError(f"table {table} ({io.rel_path(path, root)}): file not found; "
                                  "run ingest first",
                                  {"success": False, "table": table, "path": str(path)})
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any reader error means an unreadable input
        raise DataValidationError(f"table {table} ({io.rel_path(path, root)}): cannot read "
                                  f"parquet: {exc}",
                                  {"success": False, "table": table, "path": str(path)}) from exc


def raw_hashes(paths: Paths) -> dict[str, str]:
    """md5 of the raw tables a validation vouches for (relative path -> md5)."""
    files = [paths.raw_items, paths.raw_interactions, paths.raw_input_interactions]
    return {io.rel_path(f, paths.root): io.file_md5(f) for f in files if f.is_file()}


def require_current(summary: dict, paths: Paths) -> None:
    """Refuse (StageError) raw tables that changed after the validation in ``summary`` (e.g.
    ingest re-ran, validate did not): the stage reading them says what to re-run."""
    old = summary.get("raw_md5")
    if old is None:  # a summary from before raw hashes were recorded
        return
    now = raw_hashes(paths)
    changed = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
    if changed:
        raise StageError(f"{', '.join(changed)} changed since validation passed on them; re-run "
                         "`genre validate` (or `dvc repro`) first")



def _metrics(report: dict) -> dict:
    t = report["tables"]
    return {
        "success": report["success"],
        "items_rows": t["items"]["rows"],
        "interactions_rows": t["interactions"]["rows"],
        "expectations_evaluated": report["evaluated_expectations"],
        "expectations_successful": report["successful_expectations"],
        **({"quarantined_" + k: v for k, v in report["quarantine"]["bad_rows"].items()}
           if (report.get("quarantine") or {}).get("applied") else {}),
        **({"slice_rows_kept": report["slice"].get("rows_kept"),
            "slice_rows_dropped": report["slice"].get("rows_dropped")}
           if report.get("slice") else {}),
    }


def run(p: ValidateParams, paths: Paths, ingest_params: Any = None) -> dict:
    """Validate everything ingest read; write summary, Data Docs and metrics.

    The interactions checked are ALL the interactions the user gave: ingest's
    ``input_interactions.parquet`` when ``ingest.max_users`` / ``ingest.until`` sliced them
    (the slice in ``interactions.parquet`` is a subset of rows validated here; the summary
    reports its kept / dropped counts and an empty slice is refused), else
    ``interactions.parquet``. Samples in messages name the user's file and line (ingest's
    ``lines.parquet``). Refuses (StageError) raw tables that are stale with respect to the
    source files or the ``ingest`` params (``ingest_params``): re-run ``genre ingest``.

    Raises :class:`DataValidationError` (after writing ``failure.json``) when any rule is broken;
    then no summary, docs or metrics are written and a stale summary.json is gone.
    """
    from genre_tasks.data import ingest

    with logs.stage(STAGE, paths) as log:
        # A stale summary must never outlive a failed (or crashed) run: preprocess depends on it.
        for stale in (paths.validation_summary, failure_path(paths)):
            stale.unlink(missing_ok=True)
        reasons = ingest.stale_inputs(paths, ingest_params)
        if reasons:
            raise StageError("data/raw is stale: " + "; ".join(reasons) + ". Re-run `genre "
                             "ingest` (or `dvc repro validate`, which re-runs source and ingest "
                             "first), then validate.")
        manifest = io.read_json(paths.raw_manifest) if paths.raw_manifest.is_file() else {}
        sliced = paths.raw_input_interactions.is_file()
        items_file = paths.raw_items
        inter_file = paths.raw_input_interactions if sliced else paths.raw_interactions
        items = _read(items_file, "items", paths.root)
        log.read(items_file, f"{len(items)} items")
        interactions = _read(inter_file, "interactions", paths.root)
        log.read(inter_file, f"{len(interactions)} interactions"
                 + (" (all given, before slicing)" if sliced else ""))
        lines = None
        if paths.raw_lines.is_file():
            lines = pd.read_parquet(paths.raw_lines)
            log.read(paths.raw_lines, "source file + line of each raw row")
        unparsed = None
        if paths.raw_unparsed.is_file():
            unparsed = pd.read_parquet(paths.raw_unparsed)
            log.read(paths.raw_unparsed, f"{len(unparsed)} value(s) that did not parse "
                     "(rows left out by ingest)")

        docs = docs_path(paths)
        with io.atomic_dir(docs) as tmp_docs:  # replaces docs/ only if the block completes
            report = validate_tables(items, interactions, p,
                                     items_path=io.rel_path(items_file, paths.root),
                                     interactions_path=io.rel_path(inter_file, paths.root),
                                     docs_dir=tmp_docs, lines=lines)
            sl = manifest.get("slice")
            if sl:
                report["slice"] = sl
                log.logger.info("slice (ingest.until=%s, ingest.max_users=%s) of the validated "
                                "interactions: kept %s, dropped %s (%s users kept)", sl.get("until"),
                                sl.get("max_users"), sl.get("rows_kept"), sl.get("rows_dropped"),
                                sl.get("users_kept"))
                if sl.get("rows_in") and not sl.get("rows_kept"):  # (the cut may empty the table)
                    add_failure(report, "the slice (ingest.until / ingest.max_users) keeps at "
                                "least 1 interaction", f"all {sl['rows_in']} interactions were "
                                "dropped by the slice; widen ingest.until / ingest.max_users")
            if unparsed is not None and len(unparsed) and p.on_bad_rows != "quarantine":
                # ingest ran under quarantine, validate under reject: those rows are refused
                add_failure(report, UNPARSED_RULE, unparsed_failure(unparsed))
            _log_report(report, log)
            quarantine_path(paths).unlink(missing_ok=True)
            has_unparsed = unparsed is not None and len(unparsed) > 0
            if (not report["success"] or has_unparsed) and p.on_bad_rows == "quarantine":
                kept = None
                if lines is not None and "kept_row" in lines.columns:
                    part = lines[lines["table"] == "interactions"].sort_values("row")
                    kept = part["kept_row"].to_numpy() if len(part) == len(interactions) else None
                frames = {"items": normalize(items, ()), "interactions":
                          normalize(interactions, ())}
                located = {t: table_lines(lines, t, len(frames[t])) for t in frames}
                if quarantine(report, p, frames, located, kept, quarantine_path(paths),
                              paths.root, unparsed=unparsed):
                    q = report["quarantine"]
                    log.logger.warning("on_bad_rows=quarantine: %s bad item(s), %s bad "
                                       "interaction(s) quarantined to %s; the rest proceeds",
                                       q["bad_rows"]["items"], q["bad_rows"]["interactions"],
                                       q["file"])
                    log.wrote(quarantine_path(paths), "quarantined rows with reasons")
            for table in report["tables"].values():
                for e in table["expectations"]:
                    e.pop("bad_rows", None)
            if not report["success"]:
                report["failure_report"] = io.rel_path(failure_path(paths), paths.root)
                io.write_json(report, failure_path(paths))
                log.wrote(failure_path(paths), "failure report")
                raise DataValidationError(format_failure(report), report)
            if not (tmp_docs / "index.html").exists():
                raise StageError(f"GX built no Data Docs (no index.html in {tmp_docs})")
        log.wrote(docs, "Data Docs")
        if not quarantine_path(paths).exists():  # a DVC output: nothing set aside = header only
            with io.atomic_path(quarantine_path(paths)) as tmp:
                pd.DataFrame(columns=QUARANTINE_COLUMNS).to_csv(tmp, index=False)
        report["raw_md5"] = raw_hashes(paths)  # what the next stages check (require_current)
        io.write_json(report, paths.validation_summary)
        log.wrote(paths.validation_summary, "validation summary")
        io.write_json(_metrics(report), paths.metrics(STAGE))
        log.wrote(paths.metrics(STAGE), "metrics")
        # small summary (an Airflow XCom); the full GX report is in summary.json
        return {**_metrics(report), "summary": io.rel_path(paths.validation_summary, paths.root),
                "seconds": round(log.seconds, 2)}


def main(params: dict, paths: Paths) -> dict:
    """CLI / Airflow entry: validate with the ``validate`` section of ``params`` (the ``ingest``
    section, when present, is compared with what the raw tables were made with)."""
    ingest_params = None
    if "ingest" in params:
        from genre_tasks.data.ingest import IngestParams

        ingest_params = config.section(IngestParams, "ingest", params)
    return run(config.section(ValidateParams, STAGE, params), paths, ingest_params)


__all__: list[str] = ["run", "main", "validate_tables", "failure_path", "docs_path"]
