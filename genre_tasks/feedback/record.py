"""Record the store's version with DVC: ``dvc commit --force source`` + ``dvc push source``,
through DVC's Python API (no ``dvc`` process: two interpreter start-ups and DVC imports fewer
between a batch and its retrain; the Airflow workers preload DVC)."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from unittest.mock import patch

from genre_tasks import io, logs
from genre_tasks import schema as S
from genre_tasks.feedback.params import FeedbackPaths, _rel, settings
from genre_tasks.feedback.apply import store_lock, unrecorded

log = logging.getLogger("genre.feedback")


# --------------------------------------------------------------------------------------
# DVC record
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _repo(root: Path):
    """DVC's Python API at ``root`` as the ``dvc`` process would run there (cwd, no analytics,
    its messages to this module's log); a DVC error is a RuntimeError: a locked repository or
    an unreachable remote is worth retrying (not a StageError)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    from genre_tasks.registry import dvc_yaml
    from genre_tasks.registry.repro import dvc_messages

    try:
        with contextlib.chdir(root), patch.dict(os.environ, {"DVC_NO_ANALYTICS": "1"}), \
                dvc_messages(log.debug, log.warning), dvc_yaml.parsed_once(), Repo(str(root)) as repo:
            yield repo
    except DvcException as exc:
        raise RuntimeError(f"DVC failed in {root}: {exc}") from exc


def _lock_md5(root: Path, stage: str, out_path: str) -> str | None:
    import yaml

    lock = root / "dvc.lock"
    if not lock.exists():
        return None
    doc = yaml.safe_load(lock.read_text()) or {}
    for o in ((doc.get("stages") or {}).get(stage) or {}).get("outs") or []:
        if str(o.get("path")) == out_path:
            return o.get("md5")
    return None


def _source_stage(root: Path, out_path: str) -> str | None:
    """Name of the dvc.yaml stage whose output is ``out_path`` (normally ``source``)."""
    import yaml

    f = root / "dvc.yaml"
    if not f.exists():
        return None
    doc = yaml.safe_load(f.read_text()) or {}
    for name, stage in (doc.get("stages") or {}).items():
        for o in stage.get("outs") or []:
            path = next(iter(o)) if isinstance(o, dict) else o
            if str(path).rstrip("/") == out_path:
                return name
    return None


def dvc_record(root: Path, source: Path, push: bool = True) -> dict:
    """Record the current ``data/source`` with DVC: ``dvc commit --force <stage>`` (creates the
    dvc.lock entry when there is none yet) and ``dvc push <stage>`` to the default remote.

    Returns ``{"dvc": "committed" | "pushed" | "skipped: <why>", "source_md5": ...}``.
    Not a DVC repository / no stage producing data/source: skipped with a warning.
    """
    root = Path(root).resolve()
    if not (root / ".dvc").is_dir():
        log.warning("%s is not a DVC repository (no .dvc/): the store's new version is not "
                    "recorded (run `dvc init` to version data/source)", root)
        return {"dvc": "skipped: not a DVC repository", "source_md5": None}
    out_path = _rel(source, root)
    stage = _source_stage(root, out_path)
    if stage is None:
        log.warning("no stage in %s/dvc.yaml outputs %s: the store is not recorded", root, out_path)
        return {"dvc": f"skipped: no dvc.yaml stage outputs {out_path}", "source_md5": None}
    had_lock = _lock_md5(root, stage, out_path) is not None
    with _repo(root) as repo:
        repo.commit(stage, force=True)
        md5 = _lock_md5(root, stage, out_path)
        log.info("dvc commit %s -> %s md5 %s%s", stage, out_path, md5,
                 "" if had_lock else " (new dvc.lock entry)")
        result = {"dvc": "committed", "source_md5": md5, "stage": stage}
        if push:
            pushed = repo.push(targets=[stage])
            log.info("dvc push %s: %d file(s) pushed", stage, pushed)
            result["dvc"] = "pushed"
    log.info("dvc.lock now records %s = %s; commit dvc.lock with git to version it", out_path, md5)
    return result


def record_store(params: dict, paths: S.Paths, *, dvc: bool | None = None,
                 push: bool | None = None) -> dict:
    """Record the store's new version (DVC) if batches were applied since the last record.

    Returns ``{"status": "recorded" | "up_to_date", "batches": [ids], "rows": n, "dvc": ...,
    "source_md5": ...}``; ``recorded.json`` lists the batches whose version is recorded.
    DVC errors raise RuntimeError (retry); the batches then stay unrecorded.
    """
    from genre_tasks.data import adapters

    s = settings(params, dvc=dvc, dvc_push=push)
    fp = FeedbackPaths(paths, s.feedback)
    with logs.stage("feedback-record") as slog, store_lock(fp):
        pending = unrecorded(fp)
        if not pending:
            slog.logger.info("store unchanged since the last record: nothing to do")
            return {"status": "up_to_date", "batches": [], "rows": 0}
        ledger = adapters.read_ledger(fp.source)
        rows = sum(int(ledger[b]["rows"]) for b in pending)
        if s.feedback.dvc:
            result = dvc_record(paths.root, fp.source, push=s.feedback.dvc_push)
        else:
            result = {"dvc": "skipped: feedback.dvc is off", "source_md5": None}
        io.write_json({"batches": sorted(ledger), "source_md5": result.get("source_md5"),
                       "dvc": result["dvc"]}, fp.recorded)
        slog.wrote(fp.recorded, f"{len(pending)} batch(es) recorded ({result['dvc']})")
        return {"status": "recorded", "batches": pending, "rows": rows,
                "store_batches": len(ledger), **result}
