"""`ingest` stage: source files (any adapter) -> canonical raw tables in ``data/raw/``.

Reads what the ``source`` stage put under ``Paths.source`` with the adapter named by
``ingest.adapter`` (see :mod:`genre_tasks.data.adapters`) and writes

* ``Paths.raw_items`` (parquet): ``item_id``, ``title``, ``text`` (string), ``genres``
  (``list<string>``), plus the adapter's extra string columns;
* ``Paths.raw_interactions`` (parquet): ``user_id``, ``item_id`` (string), ``timestamp``
  (int64 unix seconds UTC), ``rating`` (float64, nullable), ``label`` (int8, nullable),
  ``impression_id`` (string, nullable), in source row order.

Feedback: after the adapter's base tables (base interactions cut at ``ingest.until`` when it is
set), the applied batches of the feedback store ``data/source/feedback/`` are appended in
batch-id order (see :mod:`genre_tasks.data.adapters` and :mod:`genre_tasks.feedback`); the summary
and ``metrics/ingest.json`` say how many batches / rows were added and the newest timestamp.

The adapters are lenient on content (bad values become nulls, missing mapped columns are left
out); rejecting bad data is the job of the ``validate`` stage that reads these files.
The outputs are deterministic: the same input gives byte-identical parquet files.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from genre_tasks import config, logs, schema
from genre_tasks.errors import StageError
from genre_tasks.io import atomic_path, write_json
# IngestParams and the date helpers live below the adapters; named here for the feedback code
from genre_tasks.data.adapters.params import IngestParams, as_utc_datetime, iso_timestamp  # noqa: F401
from genre_tasks.schema import Paths


def arrow_schema(df: pd.DataFrame):
    """The pyarrow schema ``df`` is written with: pandas' own, with ``genres`` as list<string>.

    (pyarrow infers ``null`` for an all-empty object column, e.g. an empty item table.)
    """
    import pyarrow as pa

    sch = pa.Schema.from_pandas(df, preserve_index=False)
    if schema.GENRES in df.columns:
        i = sch.get_field_index(schema.GENRES)
        sch = sch.set(i, pa.field(schema.GENRES, pa.list_(pa.string())))
    return sch


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df`` to parquet atomically with :func:`arrow_schema` (deterministic bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, schema=arrow_schema(df), preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def run(p: IngestParams, paths: Paths, on_bad_rows: str = "reject") -> dict:
    """Read the source files with adapter ``p.adapter`` (+ the feedback store) and write the
    canonical raw tables, the provenance side table, the manifest and ``metrics/ingest.json``.

    * ``data/raw/items.parquet``, ``data/raw/interactions.parquet``: canonical; the
      interactions after ``ingest.until`` / ``ingest.max_users`` (what preprocess trains on);
    * ``data/raw/input_interactions.parquet``: every interaction of the data set (the base cut
      at ``ingest.until`` + the feedback store), written only when ``ingest.max_users`` dropped
      rows (validate checks all of it, then the slice);
    * ``data/raw/lines.parquet``: ``table, row, source_file, source_line`` - where each row of
      items / the validated interactions table is in the user's files (validate's messages);
    * ``data/raw/manifest.json``: the source files read (path, bytes, md5), the ingest params
      and the slicing report (rows kept / dropped); validate uses it to notice stale inputs.

    Returns ``{adapter, n_items, n_interactions, n_users, items, interactions, until,
    n_feedback_batches, n_feedback_rows, feedback_batches, max_timestamp, slice, seconds}``.
    Raises :class:`~genre_tasks.errors.StageError` for an unknown adapter, a missing file or a
    malformed one (:class:`~genre_tasks.data.adapters.InputError`: file, line, column, value, rule);
    then nothing is written and the previous outputs are removed.

    ``on_bad_rows`` (``validate.on_bad_rows``): ``quarantine`` = a row whose value does not
    parse (a rating ``five``, a bad time or label) is left out of the raw tables and listed in
    ``data/raw/unparsed.parquet`` (table, source_file, source_line, column, value, rule) for
    validate's quarantine (and its ``max_bad_rows_fraction``) instead of refusing the file.
    """
    from genre_tasks.data import adapters

    with logs.stage("ingest", paths) as log:
        outputs = (paths.raw_items, paths.raw_interactions, paths.raw_input_interactions,
                   paths.raw_lines, paths.raw_manifest, paths.raw_unparsed)
        for path in adapters.source_files(p, paths.source):
            log.read(path, f"{p.adapter} source")
        ledger = adapters.read_ledger(paths.source)
        for batch_id in sorted(ledger):
            log.read(adapters.part_path(paths.source, batch_id),
                     f"feedback batch {batch_id}, {ledger[batch_id].get('rows')} rows")
        conventions: dict = {}
        collecting = (adapters.collecting_bad_rows() if on_bad_rows == "quarantine"
                      else contextlib.nullcontext(None))
        try:
            with collecting as unparsed:
                items, full = adapters.load(p, paths.source, slice_users=False, locations=True,
                                            report=conventions, until=False)
        except StageError:
            for out in outputs:  # no stale tables for a later stage to pick up
                out.unlink(missing_ok=True)
            raise
        # ingest.until defines the dataset (base rows before it + the feedback store): the base
        # rows after it are not input (a replay re-releases them as feedback batches, so keeping
        # them would make every replayed event a duplicate). validate checks this table for
        # every user; ingest.max_users only samples users from it.
        cut_report: dict = {}
        full = adapters.slice_view(p, full, cut_report, paths.source, users=False)
        sliced_report: dict = {}
        full[ROW] = np.arange(len(full), dtype=np.int64)
        interactions = adapters.slice_view(p, full, sliced_report, paths.source, until=False)
        sliced_report.update(until=p.until, rows_in=cut_report["rows_in"],
                             users_in=cut_report["users_in"],
                             dropped_by_until=cut_report["dropped_by_until"],
                             rows_dropped=cut_report["rows_in"] - sliced_report["rows_kept"])
        sliced = len(interactions) < len(full)
        kept = np.full(len(full), -1, dtype=np.int64)  # validated row -> row of the slice
        kept[interactions[ROW].to_numpy(dtype=np.int64)] = np.arange(len(interactions))
        full, interactions = full.drop(columns=[ROW]), interactions.drop(columns=[ROW])
        lines = pd.concat([_lines("items", items, paths.root, np.arange(len(items))),
                           _lines("interactions", full, paths.root, kept)], ignore_index=True)
        items = items.drop(columns=LOCATION_COLUMNS)
        full = full.drop(columns=LOCATION_COLUMNS)
        interactions = interactions.drop(columns=LOCATION_COLUMNS)
        write_table(items, paths.raw_items)
        log.wrote(paths.raw_items, f"{len(items)} items")
        write_table(interactions, paths.raw_interactions)
        log.wrote(paths.raw_interactions, f"{len(interactions)} interactions")
        if sliced:
            write_table(full, paths.raw_input_interactions)
            log.wrote(paths.raw_input_interactions,
                      f"all {len(full)} interactions given (before slicing)")
        else:
            paths.raw_input_interactions.unlink(missing_ok=True)
        write_table(lines, paths.raw_lines)
        log.wrote(paths.raw_lines, "source file + line of every raw row")
        if unparsed:
            bad = _unparsed_table(unparsed, adapters.source_files(p, paths.source), paths.root)
            write_table(bad, paths.raw_unparsed)
            log.logger.warning("validate.on_bad_rows=quarantine: %d row(s) with a value that "
                               "does not parse left out (validate quarantines them): %s",
                               len(bad), "; ".join(str(u) for u in unparsed[:3]))
            log.wrote(paths.raw_unparsed, f"{len(bad)} row(s) whose value does not parse")
        else:
            paths.raw_unparsed.unlink(missing_ok=True)
        manifest = {"adapter": p.adapter, "params": _jsonable_params(p),
                    "files": source_manifest(p, paths), "slice": sliced_report,
                    "validated_table": _rel(paths.raw_input_interactions if sliced
                                            else paths.raw_interactions, paths.root)}
        write_json(manifest, paths.raw_manifest)
        log.wrote(paths.raw_manifest, "inputs (md5) and slicing report")
        n_users = (int(interactions[schema.USER_ID].nunique())
                   if schema.USER_ID in interactions.columns else 0)
        n_feedback = sum(int(e.get("rows", 0)) for e in ledger.values())
        record = {
            "adapter": p.adapter,
            "n_items": int(len(items)),
            "n_interactions": int(len(interactions)),
            "n_users": n_users,
            "until": p.until,
            "n_feedback_batches": len(ledger),
            "n_feedback_rows": n_feedback,
            "feedback_batches": sorted(ledger),
            "max_timestamp": _max_timestamp(interactions),
            "slice": sliced_report,
            "text": conventions.get("text"),
            "placeholder_genre_items": conventions.get("placeholder_genre_items", 0),
            "unparsed_rows": len(unparsed or ()),
        }
        write_json(record, paths.metrics("ingest"))
        log.wrote(paths.metrics("ingest"), "ingest metrics (data cutoff, feedback batches)")
        return {
            **record,
            "items": str(paths.raw_items),
            "interactions": str(paths.raw_interactions),
            "seconds": round(log.seconds, 3),
        }


LOCATION_COLUMNS = [schema.SOURCE_FILE, schema.SOURCE_LINE]


def _unparsed_table(problems: list, files: list[Path], root: Path) -> pd.DataFrame:
    """The rows left out because a value did not parse, one per (row, column) problem:
    ``table`` (items / interactions, by the adapter's file), ``source_file`` (relative to
    the project root when inside it), ``source_line`` (1-based), ``column``, ``value`` (the
    raw value, shown), ``rule``."""
    from genre_tasks.data.adapters import show_value

    table_of = {str(files[0]): "items", str(files[1]): "interactions"}
    return pd.DataFrame({
        "table": pd.array([table_of.get(pr.file, "interactions") for pr in problems],
                          dtype="string"),
        "source_file": pd.array([_rel(Path(pr.file), root) for pr in problems], dtype="string"),
        "source_line": np.asarray([pr.line for pr in problems], dtype=np.int64),
        "column": pd.array([pr.column for pr in problems], dtype="string"),
        "value": pd.array([None if pr.value is None else show_value(pr.value)
                           for pr in problems], dtype="string"),
        "rule": pd.array([pr.rule for pr in problems], dtype="string"),
    })


ROW = "_validated_row"


def _lines(table: str, df: pd.DataFrame, root: Path, kept: np.ndarray) -> pd.DataFrame:
    """The side-table rows of one raw table: (table, row) -> (source_file relative to the
    project root when inside it, source_line, kept_row: its row in the table preprocess
    reads, -1 when slicing dropped it)."""
    files = df[schema.SOURCE_FILE].astype("string")
    names = {f: _rel(Path(f), root) for f in files.dropna().unique()}
    return pd.DataFrame({
        "table": pd.Series([table] * len(df), dtype="string"),
        "row": pd.Series(range(len(df)), dtype="int64"),
        schema.SOURCE_FILE: files.map(names).astype("string").reset_index(drop=True),
        schema.SOURCE_LINE: df[schema.SOURCE_LINE].astype("int64").reset_index(drop=True),
        "kept_row": pd.Series(kept, dtype="int64"),
    })


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def _jsonable_params(p: IngestParams) -> dict:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(p), default=str))


def source_manifest(p: IngestParams, paths: Paths) -> list[dict]:
    """``[{path, bytes, md5}]`` of every file ingest reads: the adapter's source files and the
    feedback store's ledger (its parts are pinned by the ledger's content hashes)."""
    from genre_tasks.data import adapters
    from genre_tasks.io import file_md5

    files = [*adapters.source_files(p, paths.source)]
    ledger = adapters.ledger_path(paths.source)
    if ledger.is_file():
        files.append(ledger)
    return [{"path": _rel(f, paths.root), "bytes": f.stat().st_size, "md5": file_md5(f)}
            for f in files if f.is_file()]


def stale_inputs(paths: Paths, p: IngestParams | None = None) -> list[str]:
    """Why ``data/raw`` no longer matches its inputs (empty: it is current).

    Compares ``data/raw/manifest.json`` (written by the last ingest) with the source files as
    they are now (size, then md5) and, when ``p`` is given, with the ``ingest`` params. A raw
    folder without a manifest (written before manifests existed) is not judged.
    """
    if not paths.raw_manifest.is_file():
        return []
    from genre_tasks.io import read_json

    manifest = read_json(paths.raw_manifest)
    reasons = []
    if p is not None and manifest.get("params") != _jsonable_params(p):
        old, new = manifest.get("params") or {}, _jsonable_params(p)
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        reasons.append(f"params ingest.{{{', '.join(keys)}}} changed since ingest ran")
    if not paths.source.exists():
        # no source folder at all: a worker that fetched only this stage's DVC inputs (data/raw;
        # the run's dvc.lock ties it to its source) has nothing to compare with - not judged
        return reasons
    now = {f["path"]: f for f in (source_manifest(p, paths) if p is not None else [])}
    for f in manifest.get("files", []):
        path = paths.root / f["path"] if not Path(f["path"]).is_absolute() else Path(f["path"])
        if not path.is_file():
            reasons.append(f"{f['path']} is gone since ingest read it")
            continue
        cur = now.get(f["path"])
        if cur is None:
            from genre_tasks.io import file_md5

            cur = {"bytes": path.stat().st_size, "md5": file_md5(path)}
        if cur["md5"] != f["md5"]:
            reasons.append(f"{f['path']} changed since ingest read it (md5 {f['md5'][:8]} -> "
                           f"{cur['md5'][:8]}, {f['bytes']} -> {cur['bytes']} bytes)")
    if p is not None:
        known = {f["path"] for f in manifest.get("files", [])}
        reasons += [f"{k} is new since ingest ran" for k in sorted(set(now) - known)]
    return reasons


def _max_timestamp(interactions: pd.DataFrame) -> int | None:
    """Newest event time (unix seconds) of the ingested data, None when there is none."""
    if schema.TIMESTAMP not in interactions.columns or not len(interactions):
        return None
    value = interactions[schema.TIMESTAMP].max()
    return None if pd.isna(value) else int(value)


def main(params: dict, paths: Paths) -> dict:
    """CLI entry point (`genre ingest`)."""
    on_bad_rows = (params.get("validate") or {}).get("on_bad_rows", "reject")
    return run(config.section(IngestParams, "ingest", params), paths, on_bad_rows=on_bad_rows)
