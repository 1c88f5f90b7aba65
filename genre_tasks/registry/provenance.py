"""What identifies an MLflow run: lineage tags tying a run (and the model versions registered
from it) to the exact code, configuration and data it was built from.

:func:`lineage_tags`: ``git_commit`` (:func:`git_commit`), ``params_hash`` (:func:`params_hash`),
``data_hash`` (:func:`combined_hash` of :func:`data_hashes`), ``split_mode`` (:func:`split_mode`)
and one ``data.<relative path>`` = md5 per data file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from genre_tasks import io
from genre_tasks import schema as S

log = logging.getLogger("genre.tracking")


def git_commit(root: str | Path = ".") -> str:
    """HEAD commit of the repository holding ``root`` (``+dirty`` if tracked files changed)."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        commit = head.stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def params_hash(params: Mapping) -> str:
    """sha256 of the canonical JSON of the (merged) params.yaml."""
    return hashlib.sha256(canonical_json(params).encode("utf-8")).hexdigest()


def key_data_files(paths: S.Paths) -> list[Path]:
    """The data a model is trained and evaluated on: processed tables + item vectors."""
    files = sorted(paths.processed_dir.glob("*.parquet")) if paths.processed_dir.exists() else []
    return [*files, paths.vectors]


def _rel(paths: S.Paths, path: Path) -> str:
    try:
        return path.resolve().relative_to(paths.root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def dvc_lock_hashes(paths: S.Paths) -> dict[str, str]:
    """md5 of every data output (under data/) recorded in dvc.lock ({} without a dvc.lock)."""
    import yaml

    lock = paths.root / "dvc.lock"
    if not lock.exists():
        return {}
    try:
        doc = yaml.safe_load(lock.read_text()) or {}
    except yaml.YAMLError as exc:
        log.warning("%s: unreadable (%s); hashing data files instead", lock, exc)
        return {}
    out: dict[str, str] = {}
    for stage in (doc.get("stages") or {}).values():
        for o in stage.get("outs") or []:
            # data outputs only: metrics/ and plots/ change with timings on every run
            if isinstance(o, dict) and str(o.get("path", "")).startswith("data/") and o.get("md5"):
                out[str(o["path"])] = str(o["md5"])
    return out


def data_hashes(paths: S.Paths) -> dict[str, str]:
    """Content hashes of the data a model is trained on: ``{relative path: md5}``.

    With a train record (data/manifests/train.json): the files train read and, back through the
    stage records, what they were made from (down to the source files ingest read), with the
    hashes they had when each stage ran (:func:`genre_tasks.manifests.lineage`): what the model
    was trained on, whatever changed since (e.g. a feedback batch landing before promote).
    Without one (a run that has not trained):

    The outputs recorded in dvc.lock if there is one (DVC's own hashes, ``.dir`` for folders);
    the key data files (processed tables, item vectors) are always hashed from the bytes on
    disk too, so the record is right even when a stage ran outside ``dvc repro``.
    """
    from genre_tasks import manifests

    trained_on = manifests.lineage(paths, "train")
    if trained_on:
        return dict(sorted(trained_on.items()))
    hashes = dvc_lock_hashes(paths)
    for f in key_data_files(paths):
        if f.exists():
            hashes[_rel(paths, f)] = io.file_md5(f)
    return dict(sorted(hashes.items()))


def combined_hash(hashes: Mapping[str, str]) -> str:
    """One short fingerprint of a {path: md5} mapping."""
    return hashlib.sha256(canonical_json(dict(hashes)).encode()).hexdigest()[:16]


def split_mode(paths: S.Paths) -> str:
    for f in (paths.split_info, paths.metrics("evaluate")):
        if f.exists():
            doc = io.read_json(f)
            mode = doc.get("mode") or doc.get("split")
            if isinstance(mode, str):
                return mode
    return "unknown"


def lineage_tags(paths: S.Paths, params: Mapping | None) -> dict[str, str]:
    """Tags that tie a run / model version to code, configuration and data.

    ``git_commit``, ``params_hash``, ``data_hash`` (fingerprint of all data hashes),
    ``split_mode`` and one ``data.<relative path>`` = md5 per data output.
    """
    hashes = data_hashes(paths)
    tags = {
        "git_commit": git_commit(paths.root),
        "params_hash": params_hash(params) if params is not None else "unknown",
        "data_hash": combined_hash(hashes),
        "split_mode": split_mode(paths),
    }
    tags.update({f"data.{k}": v for k, v in hashes.items()})
    return tags
