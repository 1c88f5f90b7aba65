"""Restore any registered model version: what it was built from, and its exact data and model.

``genre lineage <version>``   the version's MLflow run (the DAG run's run): git commit, params
                              snapshot (``run/params.yaml``), DVC lock entries (``run/dvc.lock``:
                              every stage's outputs with their md5), the GX result and the
                              metrics it was selected on.
``genre checkout <version> --dir DIR``
                              a clean DVC workspace in DIR with the run's dvc.yaml, params
                              snapshot and dvc.lock, then ``dvc pull`` from the remote: the
                              version's data and model, byte for byte (checked: DVC reports no
                              changed output). Code: ``git worktree add <dir> <git_commit>``.

The record is read from the model version's run (every version registered by the pipeline is
logged into the DAG run's MLflow run); a version carrying its own copy (tags ``genre.dvc_lock_md5``
/ ``genre.params_hash`` set at registration) is checked against it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from genre_tasks import io
from genre_tasks.errors import StageError
from genre_tasks import schema as S
from genre_tasks.registry import tracking, tracking_store
from genre_tasks.registry import workspace as W

DVC_YAML_ARTIFACT = "run/dvc.yaml"


def _version(params: dict, paths: S.Paths, version: str):
    """The model version ``version`` (a number or an alias) of ``promote.model_name``; a clear
    StageError naming the versions and aliases there are when it does not exist."""
    from mlflow.exceptions import MlflowException

    name = (params.get("promote") or {}).get("model_name", "genre-recommender")
    cl = tracking_store.client(paths)
    try:
        if not str(version).isdigit():  # an alias: champion, challenger, ...
            return cl.get_model_version_by_alias(name, str(version).lstrip("@"))
        return cl.get_model_version(name, str(version))
    except MlflowException:
        try:
            known = sorted(cl.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
            aliases = sorted(cl.get_registered_model(name).aliases)
        except MlflowException:
            known, aliases = [], []
        there = (f"versions {', '.join(str(v.version) for v in known)}; aliases {', '.join(aliases) or 'none'}"
                 if known else "no version registered")
        raise StageError(f"model {name!r} (registry {tracking_store.registry_uri(paths)}) has no version or alias "
                         f"{version!r}: {there}") from None


def _lock_entries(lock: dict) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for stage, entry in (lock.get("stages") or {}).items():
        out[stage] = {o["path"]: o.get("md5", "") for o in entry.get("outs") or []}
    return out


def record(params: dict, paths: S.Paths, version: str) -> dict[str, Any]:
    """Everything recorded about ``version`` (a number or an alias)."""
    mv = _version(params, paths, version)
    cl = tracking_store.client(paths)
    run = cl.get_run(mv.run_id)
    tags, metrics = run.data.tags, run.data.metrics
    out: dict[str, Any] = {
        "model": mv.name, "version": mv.version, "aliases": list(getattr(mv, "aliases", []) or []),
        "run_id": mv.run_id, "run_status": run.info.status,
        "airflow_run": tags.get("airflow.run_id"), "git_commit": tags.get("git_commit"),
        "params_hash": tags.get(W.PARAMS_HASH_TAG) or tags.get("params_hash"),
        "decision": mv.tags.get("decision"),
    }
    snap = tracking.download_run_file(mv.run_id, W.PARAMS_ARTIFACT, paths)
    out["params"] = yaml.safe_load(snap.read_text()) if snap else None
    lock = tracking.download_run_file(mv.run_id, W.LOCK_ARTIFACT, paths)
    out["dvc_lock"] = _lock_entries(yaml.safe_load(lock.read_text()) or {}) if lock else None
    out["gx"] = {k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith("validate.")}
    out["metrics"] = {k: v for k, v in metrics.items() if k.startswith("test.") and k.count(".") == 1}
    problems = []
    if out["params"] is None or out["dvc_lock"] is None:
        problems.append("the run has no params snapshot / dvc.lock (not trained through a run workspace)")
    for tag, value in ((W.LOCK_MD5_TAG, io.file_md5(lock) if lock else None),
                       (W.PARAMS_HASH_TAG, out["params_hash"])):
        if mv.tags.get(tag) and mv.tags[tag] != value:
            problems.append(f"model version tag {tag}={mv.tags[tag]} != run's {value}")
    out["problems"] = problems
    return out


def checkout(params: dict, paths: S.Paths, version: str, dest: str | Path) -> dict[str, Any]:
    """Restore ``version``'s data and model into the empty folder ``dest`` from the DVC remote
    (or the local cache); verify DVC sees every output exactly as the lock records it."""
    dest = Path(dest).resolve()
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest}: not empty")
    mv = _version(params, paths, version)
    snap = tracking.download_run_file(mv.run_id, W.PARAMS_ARTIFACT, paths)
    lock = tracking.download_run_file(mv.run_id, W.LOCK_ARTIFACT, paths)
    if snap is None or lock is None:
        raise FileNotFoundError(f"version {mv.version}: its run {mv.run_id} has no "
                                f"{W.PARAMS_ARTIFACT} / {W.LOCK_ARTIFACT}")
    ws = W.Workspace(dest, paths.root.resolve(), W.cache_dir(paths.root.resolve()))
    W.create(ws, yaml.safe_load(snap.read_text()))
    dvc_yaml = tracking.download_run_file(mv.run_id, DVC_YAML_ARTIFACT, paths)
    if dvc_yaml is not None:  # the pipeline definition of the run, not today's
        shutil.copyfile(dvc_yaml, dest / "dvc.yaml")
    shutil.copyfile(lock, ws.lock_file)
    # --allow-missing: outputs today's dvc.yaml declares but the run's lock does not record
    # (a version made before they existed) are skipped; the recorded ones are verified below
    pulled = W.dvc(ws, "pull" if W.has_remote(ws) else "checkout", "--allow-missing", check=False)
    if pulled.returncode != 0:
        raise RuntimeError(f"dvc pull failed:\n{pulled.stdout[-3000:]}")
    status = W.dvc(ws, "status", "--json", check=False)
    doc = json.loads(status.stdout.strip().splitlines()[-1] or "{}") if status.stdout.strip() else {}
    entries = _lock_entries(yaml.safe_load(lock.read_text()) or {})
    recorded = {path for outs in entries.values() for path in outs}
    changed = sorted({f"{stage}: {path}" for stage, items in doc.items() for item in items
                      if isinstance(item, dict) for path in (item.get("changed outs") or {})
                      if path in recorded})
    missing = sorted(p for p in recorded if not (dest / p).exists())
    changed += [f"missing: {p}" for p in missing]
    return {"version": mv.version, "run_id": mv.run_id, "dir": str(dest),
            "outputs": sum(len(v) for v in entries.values()), "changed_outputs": changed,
            "model_md5": entries.get("train", {}).get("data/model"), "ok": not changed}
