"""Run workspaces: every pipeline run (an Airflow DAG run) executes its stages through DVC in a
folder of its own, sharing only the DVC cache/remote and the MLflow store with other runs.

Layout of a workspace ``<workspaces>/<run slug>/`` (``$GENRE_WORKSPACES``, default
``<project>/runs``, ignored by git and by the project's DVC)::

    dvc.yaml, .dvcignore        copied from the project checkout (the code version that runs)
    genre_tasks/                copied too: dvc.yaml declares the code files as stage deps
    params.yaml                 the run's params SNAPSHOT: params.yaml + override files +
                                trigger form, written once at the start (what DVC reads)
    dvc.lock                    this run's lock; after every stage it is also uploaded to the
                                run's MLflow run (artifact ``run/dvc.lock``)
    .dvc/config(.local)         no_scm; cache dir ``$GENRE_DVC_CACHE`` (default the project's
                                ``.dvc/cache``: run-cache shared by all runs on this disk);
                                the project's default remote (``.dvc/config`` +
                                ``.dvc/config.local``, or ``$GENRE_DVC_REMOTE_URL``)
    .cache -> <project>/.cache  the embedding cache (only when the DVC cache is the project's)

How a stage runs (:func:`run_stage`): ``dvc repro --single-item --pull <stage>`` (through DVC's
Python API, the ``genre`` command in the same process: :mod:`genre_tasks.registry.repro`). ``--pull``
fetches, for this stage only, the missing inputs (the outputs of upstream stages named in the
run's dvc.lock) and its run-cache entries (:mod:`genre_tasks.registry.runcache`); when DVC's
run-cache already holds a run with the same command, deps and params, the stage is not computed
(outputs are checked out). Then ``dvc push <stage>`` and the stage's run-cache entries go to the remote,
so the next stage may start on another machine with an empty workspace (:func:`materialise`
rebuilds it from the project checkout + the run's MLflow artifacts ``run/params.yaml`` and
``run/dvc.lock``).

Why a workspace per run and not one project folder: two DAG runs with different params never
write the same files (no clobbering, no serialisation needed), each run's ``dvc status`` is
clean for its own params, and the same mechanism lets a task start on an empty worker.
:func:`publish` then mirrors a finished run into the project folder (dvc.lock + checkout of
the data; never the feedback store ``data/source``), so ``genre report``, ``genre recommend``,
``dvc status`` and ``dvc metrics show`` at the project root show the latest finished run.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from genre_tasks import io
from genre_tasks.registry import dvc_yaml, repro, runcache
from genre_tasks.config import OVERRIDE_ENV, apply_overrides, load_params

log = logging.getLogger("genre.workspace")

WORKSPACES_ENV = "GENRE_WORKSPACES"
CACHE_ENV = "GENRE_DVC_CACHE"
REMOTE_URL_ENV = "GENRE_DVC_REMOTE_URL"
#: endpoint of an S3-compatible remote (the remote's ``endpointurl``)
REMOTE_ENDPOINT_ENV = "GENRE_DVC_REMOTE_ENDPOINT"
REMOTE_NAME = "genre"
#: MLflow run artifacts that carry a run's record between workers
PARAMS_ARTIFACT = "run/params.yaml"
LOCK_ARTIFACT = "run/dvc.lock"
PARAMS_HASH_TAG = "genre.params_hash"
LOCK_MD5_TAG = "genre.dvc_lock_md5"
WORKSPACE_TAG = "genre.workspace"
#: copied into a workspace from the project checkout
CODE = ("dvc.yaml", ".dvcignore", "genre_tasks")
#: stages whose output holds state that other DAGs append to (the feedback store)
STORE_STAGES = ("source",)


class StageFailed(RuntimeError):
    """``dvc repro`` of a stage failed. ``refused`` = the stage itself refused its input or its
    params (``genre`` exit code 1 or 2): retrying cannot help."""

    def __init__(self, stage: str, code: int, output: str, refused: bool) -> None:
        super().__init__(f"stage {stage} failed (exit {code}):\n{output}")
        self.stage, self.code, self.output, self.refused = stage, code, output, refused


@dataclass(frozen=True)
class Workspace:
    """The folder a run's stages execute in, and the project checkout it was made from."""

    path: Path
    project: Path
    cache_dir: Path

    @property
    def params_file(self) -> Path:
        return self.path / "params.yaml"

    @property
    def lock_file(self) -> Path:
        return self.path / "dvc.lock"

    @property
    def shares_project_cache(self) -> bool:
        return self.cache_dir.resolve() == (self.project / ".dvc" / "cache").resolve()


# --- where --------------------------------------------------------------------------------------
def slug(run_id: str) -> str:
    """A folder name for an Airflow run id (``manual__2026-11-30T18:00:00+00:00``)."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._") or "run"
    return text[:120]


def workspaces_dir(project: Path) -> Path:
    env = os.environ.get(WORKSPACES_ENV, "").strip()
    return Path(env).expanduser().resolve() if env else project / "runs"


def cache_dir(project: Path) -> Path:
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser().resolve() if env else project / ".dvc" / "cache"


def workspace(project: str | Path, run_id: str) -> Workspace:
    project = Path(project).resolve()
    return Workspace(workspaces_dir(project) / slug(run_id), project, cache_dir(project))


# --- the params snapshot ------------------------------------------------------------------------
def effective_params(project: str | Path, overrides: Mapping | None = None) -> dict:
    """params.yaml + $GENRE_PARAMS_OVERRIDE files + ``overrides`` (the trigger form)."""
    project = Path(project)
    extra = [p for p in os.environ.get(OVERRIDE_ENV, "").split(os.pathsep) if p]
    files = [p if Path(p).is_absolute() else project / p for p in extra]
    saved = os.environ.pop(OVERRIDE_ENV, None)
    try:
        params = load_params(project / "params.yaml", files)
    finally:
        if saved is not None:
            os.environ[OVERRIDE_ENV] = saved
    return apply_overrides(params, dict(overrides or {}), project, "trigger form")


def params_hash(params: Mapping) -> str:
    from genre_tasks.registry.provenance import params_hash as _hash

    return _hash(params)


def dump_params(params: Mapping) -> str:
    header = ("# params SNAPSHOT of one pipeline run (params.yaml + override files + trigger form),\n"
              "# written once at the start; dvc.yaml stages read it. Do not edit.\n")
    return header + yaml.safe_dump(dict(params), sort_keys=False, allow_unicode=True)


# --- making a workspace -------------------------------------------------------------------------
def _remote_config(project: Path) -> tuple[str | None, dict]:
    """(default remote name, its settings) of the project: .dvc/config + config.local, with
    ``$GENRE_DVC_REMOTE_URL`` replacing the url (``$GENRE_DVC_REMOTE_ENDPOINT``: its endpointurl;
    credentials stay in the environment, AWS_ACCESS_KEY_ID/..., never in a file). Relative folder urls come back absolute."""
    from dvc.config import Config

    if not (project / ".dvc").is_dir():  # a project folder that is no DVC repo: no remote
        return None, {}
    conf = Config(dvc_dir=str(project / ".dvc"))
    name = conf["core"].get("remote")
    settings = dict(conf["remote"].get(name, {})) if name else {}
    url = os.environ.get(REMOTE_URL_ENV, "").strip()
    if url:
        name = name or REMOTE_NAME
        settings["url"] = url
    endpoint = os.environ.get(REMOTE_ENDPOINT_ENV, "").strip()
    if endpoint and settings.get("url"):  # an S3-compatible store (MinIO, ...); keys stay in the env
        settings["endpointurl"] = endpoint
    return (name if settings.get("url") else None), settings


def _ini(sections: Mapping[str, Mapping[str, Any]]) -> str:
    lines = []
    for header, values in sections.items():
        lines.append(f"[{header}]")
        for k, v in values.items():
            if isinstance(v, bool):
                v = str(v).lower()
            lines.append(f"    {k} = {v}")
    return "\n".join(lines) + "\n"


def _code_digest(root: Path) -> str:
    """md5 over the relative paths and bytes of the :data:`CODE` files under ``root``."""
    h = hashlib.md5()
    for name in CODE:
        src = root / name
        files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src] if src.exists() else []
        for f in files:
            if "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


@contextlib.contextmanager
def guard(ws: Workspace, exclusive: bool) -> Iterator[None]:
    """This machine's lock on ``ws`` (``fcntl.flock`` on ``.dvc/tmp/genre-workspace.lock``).

    Tasks of one DAG run share the workspace when they run on one worker, some at the same time
    (``embed_plan`` beside the data stages). Making the workspace (code copy, the dvc.lock fetched
    from MLflow) holds it exclusively; a stage holds it shared from ``dvc repro`` until its new
    dvc.lock is uploaded to MLflow. So a workspace is never re-made under a running stage, and a
    dvc.lock a stage has just written is never replaced by the older one MLflow still holds.
    Not re-entrant: never nest it (a second flock of the same file in one process waits forever).
    """
    path = ws.path / ".dvc" / "tmp" / "genre-workspace.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


#: digest of the code copied into a workspace (skips the copy when the checkout is unchanged)
CODE_STAMP = Path(".dvc") / "tmp" / "genre-code.md5"


def _copy_code(project: Path, dest: Path) -> None:
    """Copy :data:`CODE` from the checkout into the workspace, unless it already holds this
    code (the digest of the last copy): tasks after the first leave the files they may be
    importing or hashing alone."""
    digest = _code_digest(project)
    stamp = dest / CODE_STAMP
    if stamp.exists() and stamp.read_text() == digest:
        return
    for name in CODE:
        src = project / name
        if not src.exists():
            continue
        target = dest / name
        if src.is_dir():
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, target)
    io.write_text(digest, stamp)


def _seed(ws: Workspace) -> str | None:
    """A new workspace starts from the project's source data: the ``source`` entry of the
    project's dvc.lock (the feedback store as the feedback DAG / the last published run recorded
    it, checked out from the cache, or pulled by the first stage), else a copy of the project's
    unrecorded ``data/source`` (your MIND/tabular files). Returns how it was seeded."""
    if ws.lock_file.exists() or (ws.path / "data" / "source").exists():
        return None
    lock = ws.project / "dvc.lock"
    doc = (yaml.safe_load(lock.read_text()) or {}) if lock.exists() else {}
    stages = {k: v for k, v in (doc.get("stages") or {}).items() if k in STORE_STAGES}
    if stages:
        io.write_text(yaml.safe_dump({"schema": doc.get("schema", "2.0"), "stages": stages},
                                     sort_keys=False), ws.lock_file)
        _checkout(ws, list(stages))  # from the cache; else the stage pulls it
        return "lock"
    source = ws.project / "data" / "source"
    if source.is_dir():
        shutil.copytree(source, ws.path / "data" / "source")
        return "copy"
    return None


def _checkout(ws: Workspace, stages: list[str]) -> None:
    """``dvc checkout <stages>`` in ``ws`` through DVC's Python API (no ``dvc`` process: ~1.5 s
    less for the run's first task). What the cache lacks is left for the stage to pull."""
    from dvc.exceptions import DvcException

    try:
        with _repo(ws, dvc_env(ws), warn=_echo) as repo:  # a cache miss is expected: not a warning
            repo.checkout(targets=stages)
    except DvcException as exc:
        log.info("dvc checkout %s: %s (the stage pulls what the cache lacks)", " ".join(stages), exc)


def create(ws: Workspace, params: Mapping) -> Workspace:
    """Make (or refresh) ``ws``: code, DVC config, the params snapshot. Idempotent; an existing
    params.yaml with other content is an error (a run's params never change). Holds
    :func:`guard` exclusively."""
    with guard(ws, exclusive=True):
        return _create(ws, params)


def _create(ws: Workspace, params: Mapping) -> Workspace:
    ws.path.mkdir(parents=True, exist_ok=True)
    text = dump_params(params)
    if ws.params_file.exists() and ws.params_file.read_text() != text:
        old = yaml.safe_load(ws.params_file.read_text())
        if params_hash(old) != params_hash(params):
            raise RuntimeError(f"{ws.params_file}: this run's params snapshot differs from the "
                               "params given now; a run's params never change")
    _copy_code(ws.project, ws.path)
    dvc_dir = ws.path / ".dvc"
    dvc_dir.mkdir(exist_ok=True)
    name, remote = _remote_config(ws.project)
    core: dict[str, Any] = {"no_scm": True, "analytics": False, "autostage": False}
    if name:
        core["remote"] = name
    io.write_text(_ini({"core": core, "cache": {"dir": str(ws.cache_dir)}}), dvc_dir / "config")
    local = {f'remote "{name}"': remote} if name else {}
    io.write_text(_ini(local) if local else "", dvc_dir / "config.local")
    (dvc_dir / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    ws.cache_dir.mkdir(parents=True, exist_ok=True)
    cache_link = ws.path / ".cache"
    if ws.shares_project_cache and not cache_link.exists():
        (ws.project / ".cache").mkdir(exist_ok=True)
        cache_link.symlink_to(ws.project / ".cache", target_is_directory=True)
    if not ws.params_file.exists():
        io.write_text(text, ws.params_file)
    _seed(ws)
    return ws


def materialise(ws: Workspace, mlflow_run_id: str | None, tracking_paths) -> Workspace:
    """Make ``ws`` ready on this machine: from the run's MLflow artifacts when the folder is
    empty or its dvc.lock is older than the run's (another worker ran the last stage). Holds
    :func:`guard` exclusively (it waits for the stages running in ``ws`` to upload their lock)."""
    if mlflow_run_id is None:
        if not ws.params_file.exists():
            raise RuntimeError(f"{ws.path}: no params snapshot and no MLflow run to fetch it from")
        return create(ws, yaml.safe_load(ws.params_file.read_text()))
    with guard(ws, exclusive=True):
        return _materialise(ws, mlflow_run_id, tracking_paths)


def _materialise(ws: Workspace, mlflow_run_id: str, tracking_paths) -> Workspace:
    from genre_tasks.registry import tracking, tracking_store

    cl = tracking_store.client(tracking_paths)
    tags = cl.get_run(mlflow_run_id).data.tags
    if not ws.params_file.exists():
        fetched = tracking.download_run_file(mlflow_run_id, PARAMS_ARTIFACT, tracking_paths)
        if fetched is None:
            raise RuntimeError(f"MLflow run {mlflow_run_id} has no {PARAMS_ARTIFACT}: "
                               "the params snapshot task did not run")
        params = yaml.safe_load(fetched.read_text())
    else:
        params = yaml.safe_load(ws.params_file.read_text())
    _create(ws, params)
    want = tags.get(LOCK_MD5_TAG)
    have = io.file_md5(ws.lock_file) if ws.lock_file.exists() else None
    if want and want != have:
        fetched = tracking.download_run_file(mlflow_run_id, LOCK_ARTIFACT, tracking_paths)
        if fetched is not None:
            shutil.copyfile(fetched, ws.lock_file)
            log.info("dvc.lock of run %s fetched from MLflow (md5 %s)", mlflow_run_id, want)
    return ws


# --- running a stage ------------------------------------------------------------------------------
def tracking_env(project: Path) -> dict[str, str]:
    """MLFLOW_TRACKING_URI (+ artifact root) of the project's store, made explicit: code running
    with a workspace as its root must not fall back to ``<workspace>/mlflow.db``."""
    from genre_tasks import schema as S
    from genre_tasks.registry import tracking_store

    paths = S.Paths(project)
    env = {tracking_store.TRACKING_URI_ENV: tracking_store.tracking_uri(paths)}
    art = os.environ.get(tracking_store.ARTIFACTS_ENV, "").strip() or tracking_store.artifact_location(paths)
    if art:
        env[tracking_store.ARTIFACTS_ENV] = art
    return env


def dvc_env(ws: Workspace, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of the DVC subprocess: the snapshot is already merged, so no override file
    is applied again; MLflow points at the project's store, not at the workspace."""
    env = {k: v for k, v in os.environ.items() if k != OVERRIDE_ENV}
    env.update(tracking_env(ws.project))
    env["GENRE_PROJECT_ROOT"] = str(ws.path)
    env["DVC_NO_ANALYTICS"] = "1"
    env.update(extra or {})
    return env


def dvc(ws: Workspace, *args: str, env: Mapping[str, str] | None = None, check: bool = True,
        echo: bool = False) -> subprocess.CompletedProcess:
    """``dvc <args>`` in the workspace; stdout+stderr merged (and logged line by line if echo)."""
    cmd = ["dvc", *args]
    proc = subprocess.Popen(cmd, cwd=ws.path, env=dict(env or dvc_env(ws)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if echo:
            log.info("| %s", line.rstrip())
    code = proc.wait()
    out = "".join(lines)
    result = subprocess.CompletedProcess(cmd, code, out, "")
    if check and code != 0:
        raise subprocess.CalledProcessError(code, cmd, out)
    return result


def computed_stages(output: str) -> list[str]:
    """Stages ``dvc repro`` actually ran (not skipped, not restored from the run-cache)."""
    return re.findall(r"Running stage '([\w-]+)'", output)


def has_remote(ws: Workspace) -> bool:
    return "remote" in (ws.path / ".dvc" / "config").read_text()


@contextlib.contextmanager
def _timer() -> Iterator[dict]:
    box: dict = {}
    t0 = time.perf_counter()
    yield box
    box["seconds"] = round(time.perf_counter() - t0, 2)


@contextlib.contextmanager
def _dvc_api(ws: Workspace, env: Mapping[str, str]) -> Iterator[None]:
    """DVC's Python API as the ``dvc`` process would run: ``os.environ`` = ``env`` (remote
    credentials), cwd = the workspace; both restored afterwards."""
    saved, cwd = dict(os.environ), os.getcwd()
    _set_environ(env)
    os.chdir(ws.path)
    try:
        yield
    finally:
        os.chdir(cwd)
        _set_environ(saved)


@contextlib.contextmanager
def _repo(ws: Workspace, env: Mapping[str, str], warn: repro.Echo | None = None) -> Iterator[Any]:
    """DVC's ``Repo`` of ``ws`` inside :func:`_dvc_api`, its messages logged line by line (INFO;
    warnings to ``warn``, default WARNING)."""
    from dvc.repo import Repo

    with (_dvc_api(ws, env), repro.dvc_messages(_echo, warn or _warn), dvc_yaml.parsed_once(),
          Repo(str(ws.path)) as repo):
        yield repo


def _set_environ(env: Mapping[str, str]) -> None:
    """Make ``os.environ`` equal ``env`` key by key (never empty in between)."""
    for key in set(os.environ) - set(env):
        del os.environ[key]
    os.environ.update(env)


def _push(ws: Workspace, stage: str, env: Mapping[str, str]) -> None:
    """``dvc push <stage>`` and the stage's own run-cache entries, through DVC's Python API: no
    process start-up and DVC import per stage (~0.6 s; the Airflow workers preload DVC), and not
    every run-cache entry of the project each time as ``--run-cache`` would (:mod:`~genre_tasks.registry.runcache`)."""
    with _repo(ws, env) as repo:
        repo.push(targets=[stage])
        runcache.push_stage(repo, stage)


def _echo(line: str) -> None:
    log.info("| %s", line)


def _warn(line: str) -> None:
    log.warning("| %s", line)


def run_stage(ws: Workspace, stage: str, env: Mapping[str, str] | None = None, push: bool = True) -> dict:
    """``dvc repro --single-item --pull <stage>`` then ``dvc push <stage> --run-cache``, both
    through DVC's Python API, the stage's ``genre`` command called in this process
    (:mod:`genre_tasks.registry.repro`; ``$GENRE_STAGE_INPROCESS=0``: ``dvc repro`` as a process).

    Returns ``{"stage", "computed": bool, "how": "computed" | "run-cache" | "unchanged" |
    "pulled", "seconds", "push_seconds"}``. Raises :class:`StageFailed`.
    """
    full_env = dvc_env(ws, env)
    remote = has_remote(ws)
    args = ["repro", "--single-item", stage]
    if remote:
        args.insert(1, "--pull")
    with _timer() as t:
        if repro.enabled():  # DVC's API here, the stage command in this process: no start-ups
            with _dvc_api(ws, full_env):
                code, output = repro.reproduce(ws.path, stage, pull=remote, echo=_echo, warn=_warn)
            proc = subprocess.CompletedProcess(["dvc", *args], code, output, "")
        else:
            proc = dvc(ws, *args, env=full_env, check=False, echo=True)
    if proc.returncode != 0:
        m = re.search(r"exited with (\d+)", proc.stdout)
        code = int(m.group(1)) if m else proc.returncode
        raise StageFailed(stage, code, proc.stdout[-6000:], refused=bool(m) and code in (1, 2))
    out = proc.stdout
    if stage in computed_stages(out):
        how = "computed"
    elif "is cached - skipping run" in out:
        how = "run-cache"
    elif "Pulling data for" in out:
        how = "pulled"
    else:
        how = "unchanged"
    result = {"stage": stage, "computed": how == "computed", "how": how, "seconds": t["seconds"]}
    if push and remote:
        with _timer() as t:
            _push(ws, stage, full_env)
        result["push_seconds"] = t["seconds"]
    return result


def lock_entry(ws: Workspace, stage: str) -> dict:
    if not ws.lock_file.exists():
        return {}
    doc = yaml.safe_load(ws.lock_file.read_text()) or {}
    return (doc.get("stages") or {}).get(stage) or {}


def _outs_present(root: Path, entry: Mapping) -> bool:
    return all((root / o["path"]).exists() for o in entry.get("outs") or [] if "path" in o)


# --- publishing a finished run into the project folder -------------------------------------------
@contextlib.contextmanager
def _project_lock(project: Path) -> Iterator[None]:
    f = project / ".dvc" / "tmp" / "genre-publish.lock"
    f.parent.mkdir(parents=True, exist_ok=True)
    with open(f, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def publish(ws: Workspace) -> dict:
    """Mirror a finished run into the project folder: its dvc.lock (keeping the project's own
    feedback-store entry ``source`` when it has one) and ``dvc checkout`` of the other stages'
    outputs from the shared cache (``dvc pull`` when they are not in it). Serialised by a file
    lock; the project's params.yaml is never touched (``dvc status`` at the root then says
    which params of the published run differ from params.yaml)."""
    if not ws.lock_file.exists():
        return {"published": False, "why": "no dvc.lock"}
    run_doc = yaml.safe_load(ws.lock_file.read_text()) or {}
    stages = dict(run_doc.get("stages") or {})
    target = ws.project / "dvc.lock"
    with _project_lock(ws.project):
        own = yaml.safe_load(target.read_text()) if target.exists() else {}
        own_stages = (own or {}).get("stages") or {}
        kept = [s for s in STORE_STAGES if s in own_stages]
        for s in kept:
            stages[s] = own_stages[s]
        io.write_text(yaml.safe_dump({"schema": run_doc.get("schema", "2.0"), "stages": stages},
                                     sort_keys=False), target)
        # the project's own store entry is checked out only when its data is missing
        names = [s for s in stages if s not in kept or not _outs_present(ws.project, stages[s])]
        project = Workspace(ws.project, ws.project, ws.cache_dir)
        env = {k: v for k, v in os.environ.items() if k != OVERRIDE_ENV}
        verb = "checkout" if ws.shares_project_cache else "pull"
        proc = dvc(project, verb, "--force", *names, env=env, check=False)
        if proc.returncode != 0 and verb == "checkout":
            proc = dvc(project, "pull", "--force", *names, env=env, check=False)
    ok = proc.returncode == 0
    if not ok:
        log.warning("publish: dvc %s failed:\n%s", verb, proc.stdout[-3000:])
    return {"published": ok, "stages": names, "kept_from_project": kept,
            "lock_md5": hashlib.md5(target.read_bytes()).hexdigest()}


#: stage section -> (module, params dataclass) checked before a run starts
SECTIONS = {
    "ingest": ("genre_tasks.data.ingest", "IngestParams"),
    "validate": ("genre_tasks.data.validate_params", "ValidateParams"),
    "preprocess": ("genre_tasks.data.preprocess", "PreprocessParams"),
    "augment": ("genre_tasks.features.augment.params", "AugmentParams"),
    "embed": ("genre_tasks.features.embed", "EmbedParams"),
    "genre": ("genre_tasks.features.genre", "GenreParams"),
    "train": ("genre_tasks.models.params", "TrainParams"),
    "evaluate": ("genre_tasks.evaluation.evaluate", "EvaluateParams"),
    "promote": ("genre_tasks.registry.promote", "PromoteParams"),
}


def check_params(params: Mapping) -> None:
    """Load every stage section into its dataclass: bad params fail the run before any stage
    runs (raises ParamsError naming the key)."""
    import importlib

    from genre_tasks.config import section

    for name, (module, cls) in SECTIONS.items():
        section(getattr(importlib.import_module(module), cls), name, dict(params))
