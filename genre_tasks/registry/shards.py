"""Scale-out of the embed stage across workers (the training DAG's mapped ``embed_shard`` tasks).

Workers share no disk, only the shared services: the MLflow run (params snapshot, dvc.lock,
artifacts) and the DVC remote. With ``embed.shards`` = N > 1:

1. :func:`plan` reads N from the run's params snapshot: one entry per shard (N = 1: a single
   entry whose task returns at once, so the embed task does all the work, as before).
2. :func:`run_embed_shard` (one mapped task per shard, on any worker): builds its own workspace
   ``<workspaces>/<run>.embed-shard-<i>`` from the MLflow run (like any stage task), takes the
   items (and augment outputs) from the DVC cache/remote with ``dvc pull`` (``checkout`` without
   a remote), encodes its disjoint slice of the distinct texts
   (:func:`genre_tasks.features.embed.run_shard`) and logs the part as the run's artifact
   ``embed_shards/part-<i>-of-<N>.npz``. A retried shard writes the same file again: idempotent.
3. :func:`collect` (the embed task, before ``dvc repro embed``): downloads the N parts and adds
   them to the workspace's embedding cache (:func:`genre_tasks.features.embed.import_shard`), so
   the embed DVC stage finds every text cached and encodes nothing; it writes the same outputs and
   the same dvc.lock entry as the single-process run. A missing or bad part only means the embed
   stage encodes those texts itself: a shard can cost time, never change a vector.
"""
from __future__ import annotations

import logging
from pathlib import Path

import yaml

from genre_tasks import config
from genre_tasks.features import embed as E
from genre_tasks.registry import workspace as W

log = logging.getLogger("genre.shards")

#: MLflow artifact folder of the parts
ARTIFACT_DIR = "embed_shards"


def embed_params(ws: W.Workspace) -> E.EmbedParams:
    params = yaml.safe_load(ws.params_file.read_text()) or {}
    return config.section(E.EmbedParams, "embed", params)


def plan(ws: W.Workspace) -> list[dict]:
    """What the mapped shard task expands over: ``[{"shard": i, "of": N}]``. For ``embed.shards:
    1`` one entry ``{"shard": 0, "of": 1}`` whose task returns at once (no work: the embed stage
    encodes everything, as before); an empty map would be skipped, and a skipped task right
    after the setup task would need a trigger rule Airflow refuses there."""
    n = embed_params(ws).shards
    return [{"shard": i, "of": n} for i in range(n)]


def shard_workspace(ws: W.Workspace, shard: int) -> W.Workspace:
    """A shard's own workspace (a worker of its own; never the run's folder, where DVC runs)."""
    return W.Workspace(ws.path.parent / f"{ws.path.name}.embed-shard-{shard}", ws.project, ws.cache_dir)


def run_embed_shard(ws: W.Workspace, mlflow_run_id: str | None, shard: int, tracking_paths) -> dict:
    """Encode shard ``shard`` in its own workspace and upload its part to the MLflow run."""
    from genre_tasks.registry import tracking
    from genre_tasks.schema import Paths

    sw = shard_workspace(ws, shard)
    W.materialise(sw, mlflow_run_id, tracking_paths)
    inputs = ("preprocess", "augment")
    W.dvc(sw, "pull" if W.has_remote(sw) else "checkout", *inputs, echo=True)
    p = embed_params(sw)
    out_dir = sw.path / "data" / "embed_shards"
    summary = E.run_shard(p, Paths(sw.path), shard, out_dir)
    if mlflow_run_id:
        tracking.log_artifact(mlflow_run_id, Path(summary["file"]), tracking_paths, ARTIFACT_DIR)
        summary["artifact"] = f"{ARTIFACT_DIR}/{Path(summary['file']).name}"
    return summary


def collect(ws: W.Workspace, mlflow_run_id: str | None, tracking_paths) -> dict:
    """Import every shard part of the run into ``ws``'s embedding cache (no-op for 1 shard)."""
    from genre_tasks.registry import tracking
    from genre_tasks.schema import Paths

    p = embed_params(ws)
    out = {"shards": p.shards, "parts_imported": 0, "vectors_imported": 0, "parts_missing": []}
    if p.shards <= 1 or not mlflow_run_id:
        return out
    for shard in range(p.shards):
        name = f"{ARTIFACT_DIR}/{E.shard_file_name(shard, p.shards)}"
        part = tracking.download_run_file(mlflow_run_id, name, tracking_paths)
        if part is None:
            log.warning("embed: shard part %s is missing; the embed stage encodes its texts", name)
            out["parts_missing"].append(shard)
            continue
        n = E.import_shard(p, Paths(ws.path), part)
        out["vectors_imported"] += n
        out["parts_imported"] += int(n > 0)
    log.info("embed shards collected: %s", out)
    return out


__all__ = ["ARTIFACT_DIR", "collect", "embed_params", "plan", "run_embed_shard", "shard_workspace"]
