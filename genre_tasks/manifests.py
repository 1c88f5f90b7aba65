"""What each stage read and wrote, by content hash: ``data/manifests/<stage>.json``.

Every stage run through :func:`genre_tasks.logs.stage` with ``paths`` records, when it
succeeds, the md5 of every file it logged as read or written (folders file by file)::

    {"stage": "train", "reads": {"data/processed/items.parquet": "<md5>", ...},
     "writes": {"data/model/hybrid/model.pt": "<md5>", ...}}

These records are what the registry gate trusts (see :func:`check_consumer`): the inputs a
model was trained on must be the bytes their producing stage wrote, and still be on disk when
the model is judged. They are DVC outputs of their stage, so they travel with the data.
Paths are relative to the project root; only files under ``data/`` are recorded (caches and
installed packages are not pipeline data).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from genre_tasks import io
from genre_tasks import schema as S

#: the folder of the stage records (a DVC output of each stage)
DIRNAME = "manifests"
#: stages whose records are consulted, in pipeline order (not source: data/source also holds the
#: feedback store, which the feedback DAG changes between source runs)
STAGES = ("ingest", "validate", "preprocess", "embed", "genre", "train", "evaluate")


def manifest_dir(paths: S.Paths) -> Path:
    return paths.root / "data" / DIRNAME


def manifest_path(paths: S.Paths, stage: str) -> Path:
    return manifest_dir(paths) / f"{stage}.json"


def relative(paths: S.Paths, path: str | Path) -> str | None:
    """``path`` relative to the project root if it is pipeline data (under data/), else None."""
    try:
        rel = Path(path).resolve().relative_to(paths.root.resolve())
    except ValueError:
        return None
    if not rel.parts or rel.parts[0] != "data" or (len(rel.parts) > 1 and rel.parts[1] == DIRNAME):
        return None
    return rel.as_posix()


def hash_files(paths: S.Paths, entries: Iterable[str | Path]) -> dict[str, str]:
    """{relative path: md5} of the files (folders expanded, sorted) under data/ in ``entries``."""
    out: dict[str, str] = {}
    for entry in entries:
        p = Path(entry)
        if not p.is_absolute():
            p = paths.root / p if not p.exists() else p
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            rel = relative(paths, f)
            if rel is not None and f.is_file() and not f.name.startswith(".tmp"):
                out[rel] = io.file_md5(f)
    return dict(sorted(out.items()))


def write(paths: S.Paths, stage: str, reads: Iterable[str | Path], writes: Iterable[str | Path]) -> Path:
    """Record (atomically) what ``stage`` read and wrote."""
    doc = {"stage": stage, "reads": hash_files(paths, reads), "writes": hash_files(paths, writes)}
    return io.write_json(doc, manifest_path(paths, stage))


def load(paths: S.Paths, stage: str) -> dict | None:
    f = manifest_path(paths, stage)
    return io.read_json(f) if f.exists() else None


def producers(paths: S.Paths) -> dict[str, tuple[str, str]]:
    """{relative path: (stage, md5)} of every file a stage recorded as written (later stages win)."""
    out: dict[str, tuple[str, str]] = {}
    for stage in STAGES:
        doc = load(paths, stage)
        for rel, md5 in ((doc or {}).get("writes") or {}).items():
            out[rel] = (stage, md5)
    return out


def check_consumer(paths: S.Paths, stage: str, prefixes: tuple[str, ...] = ("data/",)) -> list[str]:
    """Problems (empty = none) with the inputs ``stage`` recorded reading under ``prefixes``:

    * the file is gone, or its bytes differ from what ``stage`` read (changed since it ran);
    * the bytes ``stage`` read differ from what the producing stage recorded writing (the file
      was altered between the two stages, e.g. vectors shuffled by hand, or produced by a run
      of the producer that left no record).
    """
    doc = load(paths, stage)
    if doc is None:
        return [f"{manifest_path(paths, stage)}: missing; run the {stage} stage (it records what it read)"]
    made = producers(paths)
    problems = []
    for rel, md5 in sorted((doc.get("reads") or {}).items()):
        if not rel.startswith(prefixes):
            continue
        f = paths.root / rel
        if not f.is_file():
            problems.append(f"{rel}: read by {stage} but no longer exists; re-run {stage}")
            continue
        now = io.file_md5(f)
        if now != md5:
            problems.append(f"{rel}: changed since {stage} read it (md5 {md5[:10]} then, {now[:10]} now); "
                            f"re-run {stage}")
            continue
        producer = made.get(rel)
        if producer is not None and producer[0] != stage and producer[1] != md5:
            problems.append(f"{rel}: {stage} read md5 {md5[:10]} but the {producer[0]} stage recorded "
                            f"writing {producer[1][:10]} ({manifest_path(paths, producer[0])}): the file "
                            f"was altered outside the pipeline; re-run {producer[0]} and what follows")
    return problems


def reads(paths: S.Paths, stage: str, prefix: str = "data/") -> dict[str, str]:
    """{relative path: md5} ``stage`` recorded reading under ``prefix`` ({} without a record)."""
    doc = load(paths, stage) or {}
    return {k: v for k, v in (doc.get("reads") or {}).items() if k.startswith(prefix)}


def lineage(paths: S.Paths, stage: str) -> dict[str, str]:
    """{relative path: md5} of everything ``stage``'s inputs were made from, as recorded when
    each stage ran: the files ``stage`` read, then, for each one, what its producing stage read
    (only while the chain is consistent: the producer wrote exactly the bytes the consumer read),
    back to the source files ingest read. Files changed after the fact (a feedback batch landing
    in data/source while a model trains) do not enter: the record is of what was used."""
    made = producers(paths)
    out: dict[str, str] = {}
    todo = list(reads(paths, stage).items())
    seen_stages: set[str] = set()
    while todo:
        rel, md5 = todo.pop()
        if rel in out:
            continue
        out[rel] = md5
        producer = made.get(rel)
        if producer is None or producer[1] != md5 or producer[0] in seen_stages:
            continue
        seen_stages.add(producer[0])
        todo.extend(reads(paths, producer[0]).items())
    return dict(sorted(out.items()))
