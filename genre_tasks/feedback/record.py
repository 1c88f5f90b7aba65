"""Record the store's version with DVC: ``dvc commit --force source`` + ``dvc push source``."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from genre_tasks import io, logs
from genre_tasks import schema as S
from genre_tasks.feedback.params import FeedbackPaths, _rel, settings
from genre_tasks.feedback.apply import store_lock, unrecorded

log = logging.getLogger("genre.feedback")


# --------------------------------------------------------------------------------------
# DVC record
# --------------------------------------------------------------------------------------
def _dvc(root: Path, *args: str, timeout: int = 600) -> str:
    cmd = [sys.executable, "-m", "dvc", *args]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout, env=env)
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        # not a StageError: a locked repo or an unreachable remote is worth retrying
        raise RuntimeError(f"`dvc {' '.join(args)}` failed ({proc.returncode}) in {root}:\n{out[-3000:]}")
    return out


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
    out = _dvc(root, "commit", "--force", stage)
    md5 = _lock_md5(root, stage, out_path)
    log.info("dvc commit %s: %s -> %s md5 %s%s", stage, out or "ok", out_path, md5,
             "" if had_lock else " (new dvc.lock entry)")
    result = {"dvc": "committed", "source_md5": md5, "stage": stage}
    if push:
        out = _dvc(root, "push", stage)
        log.info("dvc push %s: %s", stage, out.splitlines()[-1] if out else "ok")
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
