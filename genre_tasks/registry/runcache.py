"""DVC's run-cache moved one stage at a time between this machine and the remote.

``dvc repro --pull`` starts by copying **every** run-cache entry of the remote into the local
cache, and ``dvc push --run-cache`` copies every local entry to the remote, both unconditionally
(``StageCache.transfer(force=True)``). A run-cache entry is one small file per stage execution
(``runs/<key[:2]>/<key>/<value>``), so every stage task paid for all the stage runs the project
ever had: on a folder remote ~1.5 s a stage after a few dozen runs, on S3 a LIST and a GET/PUT
per entry, growing without bound.

A stage only ever looks up its own key (the hash of its command, dependency hashes and params:
``StageCache._load``), so that is all that moves here:

* :func:`fetch_on_lookup`: while ``dvc repro --pull`` runs, the bulk pull is off and the stage's
  own key is fetched from the remote at the moment DVC looks it up (after its missing inputs
  were pulled and their hashes computed), entries already here are not copied again;
* :func:`push_stage`: after the stage, the entries under its key (the run just recorded, or the
  one restored) that the remote does not have yet.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

log = logging.getLogger("genre.runcache")

#: DVC keeps the run-cache in its legacy (md5-dos2unix) object layout, locally and on the remote
_HASH_NAME = "md5-dos2unix"


def _entries(odb, key: str) -> str:
    return odb.fs.join(odb.path, "runs", key[:2], key)


def _copy_missing(from_odb, to_odb, key: str) -> int:
    """Copy the entries under ``key`` that ``to_odb`` lacks; return how many were copied."""
    from dvc.fs import generic

    src_dir = _entries(from_odb, key)
    if not from_odb.fs.exists(src_dir):
        return 0
    copied = 0
    for src in from_odb.fs.find(src_dir):
        dst = to_odb.fs.join(_entries(to_odb, key), from_odb.fs.name(src))
        if to_odb.fs.exists(dst):
            continue
        to_odb.fs.makedirs(to_odb.fs.parent(dst), exist_ok=True)
        generic.copy(from_odb.fs, src, to_odb.fs, dst)
        copied += 1
    return copied


def _remote_odb(repo):
    from dvc.stage.cache import RunCacheNotSupported
    from dvc.config import RemoteConfigError

    try:
        return repo.cloud.get_remote_odb(None, "run-cache", hash_name=_HASH_NAME)
    except RemoteConfigError as exc:
        raise RunCacheNotSupported(exc) from exc


@contextlib.contextmanager
def fetch_on_lookup(repo) -> Iterator[None]:
    """For ``repo.reproduce(..., pull=True)``: no bulk run-cache pull; each stage's own entries
    are fetched from the remote when DVC looks them up."""
    from dvc.stage.cache import RunCacheNotSupported, _get_stage_hash

    cache = repo.stage_cache
    load = cache._load

    def _load(stage):
        try:
            key = _get_stage_hash(stage)
            n = _copy_missing(_remote_odb(repo), repo.cache.legacy, key)
            if n:
                log.debug("run-cache: %d entries of %s fetched", n, stage.addressing)
        except RunCacheNotSupported as exc:  # what DVC's bulk pull does: warn and go on
            log.warning("Failed to pull run cache: %s", exc)
        return load(stage)

    cache.pull = lambda *args, **kwargs: []  # noqa: ARG005 - the bulk pull DVC would start with
    cache._load = _load
    try:
        yield
    finally:
        del cache.pull, cache._load


def push_stage(repo, name: str) -> int:
    """Send the run-cache entries of stage ``name`` (as dvc.yaml + dvc.lock now describe it)
    that the remote lacks; return how many were sent. Stages DVC does not run-cache (no
    command, deps or outs; always changed) have none."""
    from dvc.stage.cache import RunCacheNotSupported, _can_hash, _get_stage_hash

    stage = repo.stage.collect(name)[0]
    if not _can_hash(stage):
        return 0
    try:
        return _copy_missing(repo.cache.legacy, _remote_odb(repo), _get_stage_hash(stage))
    except RunCacheNotSupported as exc:  # http remotes: as `dvc push --run-cache` (debug there)
        log.debug("run-cache not pushed: %s", exc)
        return 0
