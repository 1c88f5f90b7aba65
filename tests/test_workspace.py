"""Run workspaces (genre_tasks.registry.workspace): the params snapshot, the DVC config of a workspace,
and (slow) stages of one pipeline run in two empty working directories that share nothing but
the DVC remote and the MLflow store, giving the same model as a single-directory run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from genre_tasks.registry import workspace as W
from genre_tasks.config import OVERRIDE_ENV, deep_merge

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def make_project(tmp: Path, remote: Path | None) -> Path:
    """A project checkout: code, dvc.yaml, params.yaml, .dvc/config naming ``remote``."""
    project = tmp / "project"
    project.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy2(ROOT / name, project / name)
    shutil.copytree(ROOT / "configs", project / "configs")
    shutil.copytree(ROOT / "genre_tasks", project / "genre_tasks",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (project / ".dvc").mkdir()
    conf = "[core]\n    analytics = false\n    no_scm = true\n"
    if remote is not None:
        conf += f"    remote = shared\n['remote \"shared\"']\n    url = {remote}\n"
    (project / ".dvc" / "config").write_text(conf)
    return project


def test_slug_is_a_folder_name():
    assert W.slug("manual__2026-11-30T18:00:00+00:00") == "manual__2026-11-30T18_00_00_00_00"
    assert "/" not in W.slug("a/../b") and W.slug("") == "run"


def test_snapshot_merges_override_files_and_form_once(tmp_path, monkeypatch):
    project = make_project(tmp_path, None)
    monkeypatch.setenv(OVERRIDE_ENV, "configs/tiny.yaml")  # relative to the project
    params = W.effective_params(project, {"train": {"epochs": 2}})
    assert params["ingest"]["max_users"] == 60  # from configs/tiny.yaml
    assert params["train"]["epochs"] == 2 and params["train"]["dim"] == 32  # form wins, tiny kept
    assert os.environ[OVERRIDE_ENV] == "configs/tiny.yaml"  # restored
    W.check_params(params)

    ws = W.create(W.workspace(project, "run-1"), params)
    assert yaml.safe_load(ws.params_file.read_text()) == params
    assert ws.path == project / "runs" / "run-1"
    assert (ws.path / "genre_tasks" / "models" / "train.py").read_bytes() == (ROOT / "genre_tasks" / "models" / "train.py").read_bytes()
    config = (ws.path / ".dvc" / "config").read_text()
    assert f"dir = {project / '.dvc' / 'cache'}" in config and "no_scm = true" in config
    assert (ws.path / ".cache").resolve() == (project / ".cache").resolve()  # embedding cache
    # the DVC subprocess never applies an override file again: the snapshot has it all
    assert OVERRIDE_ENV not in W.dvc_env(ws)
    assert W.dvc_env(ws)["MLFLOW_TRACKING_URI"] == f"sqlite:///{project / 'mlflow.db'}"

    W.create(ws, params)  # idempotent
    with pytest.raises(RuntimeError, match="never change"):
        W.create(ws, deep_merge(params, {"train": {"epochs": 3}}))


def test_a_new_workspace_starts_from_the_stores_recorded_version(tmp_path):
    """The project's dvc.lock records the feedback store (stage ``source``): a new run's
    workspace gets that entry and its data checked out from the shared cache (DVC's API)."""
    project = make_project(tmp_path, None)
    store = project / "data" / "source"
    (store / "feedback").mkdir(parents=True)
    (store / "feedback" / "w1.csv").write_text("user_id,item_id\n1,2\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([str(BIN / "dvc"), "commit", "--force", "-q", "source"], cwd=project, env=env, check=True)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert "source" in lock["stages"]

    ws = W.create(W.workspace(project, "run-seeded"), W.effective_params(project))
    assert (ws.path / "data" / "source" / "feedback" / "w1.csv").read_text() == "user_id,item_id\n1,2\n"
    assert yaml.safe_load(ws.lock_file.read_text())["stages"] == {"source": lock["stages"]["source"]}
    # nothing in the cache for it (another machine): the workspace is made; the stage pulls it
    shutil.rmtree(project / ".dvc" / "cache")
    other = W.create(W.workspace(project, "run-no-cache"), W.effective_params(project))
    assert other.lock_file.exists() and not (other.path / "data" / "source" / "feedback").exists()


def test_workspace_takes_the_project_remote_and_env_override(tmp_path, monkeypatch):
    project = make_project(tmp_path, Path("../store-rel"))  # relative to .dvc/, as in the repo
    ws = W.create(W.workspace(project, "r"), W.effective_params(project))
    local = (ws.path / ".dvc" / "config.local").read_text()
    assert f"url = {(project / 'store-rel').resolve()}" in local and W.has_remote(ws)
    monkeypatch.setenv(W.REMOTE_URL_ENV, "s3://bucket/genre")
    monkeypatch.setenv(W.WORKSPACES_ENV, str(tmp_path / "worker"))
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path / "worker-cache"))
    other = W.create(W.workspace(project, "r"), W.effective_params(project))
    assert other.path == tmp_path / "worker" / "r" and not other.shares_project_cache
    assert "url = s3://bucket/genre" in (other.path / ".dvc" / "config.local").read_text()
    assert not (other.path / ".cache").exists()
    # an S3-compatible endpoint (the genre_dvc_remote connection's extra) goes into the remote;
    # the keys stay in the environment, never in the workspace's config files
    monkeypatch.setenv(W.REMOTE_ENDPOINT_ENV, "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-in-a-file")
    third = W.create(W.workspace(project, "r2"), W.effective_params(project))
    conf = (third.path / ".dvc" / "config.local").read_text() + (third.path / ".dvc" / "config").read_text()
    assert "endpointurl = http://127.0.0.1:9000" in conf and "never-in-a-file" not in conf


def test_tasks_of_one_run_on_one_worker_do_not_remake_the_workspace_under_each_other(tmp_path):
    """Tasks of a run that share a worker share its workspace, some at once (embed_plan beside
    ingest): the code is copied once (a later task leaves the files a running stage imports and
    hashes alone), re-copied only when the checkout changed, and re-making the workspace waits
    for a running stage (shared guard) to finish. Before: every task rmtree'd and re-copied
    genre_tasks/, and a parallel task failed with FileNotFoundError mid-copy."""
    import threading

    project = make_project(tmp_path, None)
    params = W.effective_params(project, {})
    ws = W.create(W.workspace(project, "run-1"), params)
    train_py = ws.path / "genre_tasks" / "models" / "train.py"
    inode = train_py.stat().st_ino
    W.create(ws, params)  # a second task: same code, nothing copied again
    assert train_py.stat().st_ino == inode
    (project / "genre_tasks" / "models" / "train.py").write_text("# changed\n")
    W.create(ws, params)  # the checkout changed: the workspace follows it
    assert train_py.read_text() == "# changed\n"

    events: list[str] = []
    stage_running = threading.Event()
    release = threading.Event()

    def stage():  # a stage task between `dvc repro` and its dvc.lock upload
        with W.guard(ws, exclusive=False):
            events.append("stage start")
            stage_running.set()
            release.wait(10)
            events.append("stage end")

    def second_stage():  # shared: runs beside the first
        stage_running.wait(10)
        with W.guard(ws, exclusive=False):
            events.append("parallel stage")

    def remake():
        stage_running.wait(10)
        W.materialise(ws, None, None)  # exclusive: waits for the stage
        events.append("remade")

    threads = [threading.Thread(target=f) for f in (stage, second_stage, remake)]
    for t in threads:
        t.start()
    stage_running.wait(10)
    time.sleep(0.5)
    assert events == ["stage start", "parallel stage"]  # the remake is waiting
    release.set()
    for t in threads:
        t.join(10)
    assert events == ["stage start", "parallel stage", "stage end", "remade"]


def test_concurrent_workspace_creation_in_two_processes(tmp_path):
    project = make_project(tmp_path, None)
    code = ("import sys; from genre_tasks.registry import workspace as W; "
            "p = W.effective_params(sys.argv[1], {}); "
            "[W.create(W.workspace(sys.argv[1], 'run-1'), p) for _ in range(5)]")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(project)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        assert proc.wait(120) == 0, proc.stderr.read()
    ws = W.workspace(project, "run-1")
    assert (ws.path / "genre_tasks" / "models" / "train.py").read_bytes() == \
        (project / "genre_tasks" / "models" / "train.py").read_bytes()


def test_run_stage_reports_what_dvc_did_and_pushes(tmp_path, monkeypatch):
    """run_stage reads what DVC did (computed / run-cache / unchanged), pushes through DVC's
    Python API, and turns a stage that exits 2 into a refusal; the task's environment and cwd
    are left as they were."""
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    path, remote = tmp_path / "ws", tmp_path / "remote"
    path.mkdir()
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=path, check=True)
    subprocess.run([str(BIN / "dvc"), "remote", "add", "-d", "r", str(remote)], cwd=path, check=True)
    (path / "in.txt").write_text("a\n")
    (path / "dvc.yaml").write_text(
        "stages:\n"
        "  copy:\n    cmd: cp in.txt out.txt && echo \"$GENRE_MARK\" > mark.txt\n"
        "    deps: [in.txt]\n    outs: [out.txt, mark.txt]\n"
        "  refuse:\n    cmd: exit 2\n    deps: [in.txt]\n    outs: [never.txt]\n")
    ws = W.Workspace(path, tmp_path, path / ".dvc" / "cache")
    env_before, cwd_before = dict(os.environ), os.getcwd()

    first = W.run_stage(ws, "copy", env={"GENRE_MARK": "from-the-task"})
    assert first["how"] == "computed" and "push_seconds" in first
    assert (path / "out.txt").read_text() == "a\n"
    assert (path / "mark.txt").read_text() == "from-the-task\n"  # the stage saw the env given
    assert any(remote.rglob("*")), "pushed to the remote"
    assert W.run_stage(ws, "copy", env={"GENRE_MARK": "from-the-task"})["how"] == "unchanged"
    (path / "out.txt").unlink()
    (path / "mark.txt").unlink()
    (path / "dvc.lock").unlink()
    assert W.run_stage(ws, "copy", env={"GENRE_MARK": "from-the-task"})["how"] == "run-cache"

    with pytest.raises(W.StageFailed) as failed:
        W.run_stage(ws, "refuse")
    assert failed.value.code == 2 and failed.value.refused
    assert dict(os.environ) == env_before and os.getcwd() == cwd_before


def test_computed_stages_reads_dvc_output():
    out = ("Stage 'ingest' is cached - skipping run, checking out outputs\n"
           "Running stage 'train':\n> genre train\nStage 'genre' didn't change, skipping\n")
    assert W.computed_stages(out) == ["train"]


# --- two empty working directories sharing only the DVC remote and the MLflow store ------------
def _model_md5(ws: W.Workspace) -> str:
    outs = W.lock_entry(ws, "train")["outs"]
    return next(o["md5"] for o in outs if o["path"] == "data/model")


def _env(tmp: Path) -> dict:
    return {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
            "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}",
            "GENRE_MLFLOW_ARTIFACTS": str(tmp / "mlflow" / "artifacts")}


@pytest.mark.e2e
@pytest.mark.slow
def test_stages_on_two_empty_workers_give_the_single_directory_model(tmp_path, monkeypatch):
    from genre_tasks.registry import tracking, tracking_store
    from genre_tasks.schema import Paths

    (tmp_path / "mlflow").mkdir()
    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(OVERRIDE_ENV, raising=False)
    monkeypatch.delenv(tracking_store.RUN_ID_ENV, raising=False)
    remote = tmp_path / "remote"
    project = make_project(tmp_path, remote)
    # the committed tiny config (it sets evaluate/promote values, which a trigger form may not)
    tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    params = deep_merge(deep_merge(W.effective_params(project), tiny),
                        {"ingest": {"max_users": 30}, "train": {"strategies": ["content"], "epochs": 2}})
    paths = Paths(project)
    tracking_store.init_store(paths)  # what the DAG's first task does
    mlflow_run = tracking.create_run(paths, None, run_name="two-workers")
    timings: dict[str, float] = {}

    def worker(name: str, stages: list[str]) -> W.Workspace:
        monkeypatch.setenv(W.WORKSPACES_ENV, str(tmp_path / name))
        monkeypatch.setenv(W.CACHE_ENV, str(tmp_path / name / "cache"))
        ws = W.workspace(project, "run-1")
        if not ws.path.exists() and name == "worker-a":  # the run's first task: the snapshot
            W.create(ws, params)
            tracking.log_params_snapshot(mlflow_run, params, ws.params_file, paths)
        W.materialise(ws, mlflow_run, paths)
        for stage in stages:
            t0 = time.perf_counter()
            W.run_stage(ws, stage, env={tracking_store.RUN_ID_ENV: mlflow_run})
            tracking.log_run_lock(mlflow_run, ws.lock_file, paths)
            timings[f"{name}:{stage}"] = time.perf_counter() - t0
        return ws

    a = worker("worker-a", ["source", "ingest", "validate", "preprocess", "augment", "embed", "genre"])
    b = worker("worker-b", ["train", "evaluate"])  # empty folder, empty cache
    assert not (a.path / "data" / "model").exists()
    # worker B fetched exactly the inputs of its stages: no source/raw data, no DVC-run-cache miss
    present = sorted(p.name for p in (b.path / "data").iterdir())
    # (+ the stage records of train/evaluate and of the producers promote checks them against)
    assert present == ["embeddings", "eval", "genre", "manifests", "model", "processed"], present
    assert yaml.safe_load(b.params_file.read_text()) == params
    status = W.dvc(b, "status", "train", "evaluate")
    assert "up to date" in status.stdout, status.stdout

    # the same pipeline in ONE directory, with a cache and a remote of its own (no reuse)
    monkeypatch.setenv(W.WORKSPACES_ENV, str(tmp_path / "single"))
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path / "single" / "cache"))
    monkeypatch.setenv(W.REMOTE_URL_ENV, str(tmp_path / "single-remote"))
    c = W.create(W.workspace(project, "run-1"), params)
    # only the MiniLM text cache is borrowed from worker A (it saves re-encoding, never changes
    # a vector): every stage still runs here, nothing comes from A's DVC cache or remote
    (c.path / ".cache").symlink_to(a.path / ".cache", target_is_directory=True)
    t0 = time.perf_counter()
    for stage in ["source", "ingest", "validate", "preprocess", "augment", "embed", "genre", "train", "evaluate"]:
        result = W.run_stage(c, stage)
        assert result["computed"], result  # nothing reused from the two workers
    timings["single"] = time.perf_counter() - t0
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})

    assert _model_md5(b) == _model_md5(c)  # the same model, byte for byte
    evals = [[o for o in W.lock_entry(ws, "evaluate")["outs"] if o["path"] == "data/eval"] for ws in (b, c)]
    assert evals[0] == evals[1] and evals[0]  # the same comparison table
    # the run's record in MLflow is the lock worker B wrote last
    fetched = tracking.download_run_file(mlflow_run, W.LOCK_ARTIFACT, paths)
    assert fetched.read_bytes() == b.lock_file.read_bytes()


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_committed_config_gives_valid_params(config):
    """Each documented override file (configs/*.yaml), on top of params.yaml, loads into every
    stage's params dataclass: a key or value an option no longer takes fails here, not in a
    user's run."""
    from genre_tasks.config import load_params

    W.check_params(load_params(ROOT / "params.yaml", [ROOT / "configs" / config]))
