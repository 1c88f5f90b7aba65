"""The genre_feedback DAG: integrity (fast) and an end-to-end `airflow dags test` run (slow).

End to end: a scratch project on a slice of MovieLens-100k (initial store = before 1998-03-02,
30 users, an EASE model force-promoted to @champion; GENRE_E2E_SIZE=full: every user and
params.yaml's models), a DVC repo
with a local remote, then the replay releases 1998-W10 and a corrupted copy of 1998-W11. One
DAG run must quarantine the corrupted batch, score the champion on 1998-W10, apply it, record
it with DVC and emit the asset event; a second run (nothing new) must emit nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _parse_in_subprocess(env_extra: dict | None = None) -> dict:
    code = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags["genre_feedback"]
# the ground-floor genre_tasks modules are light (stdlib + PyYAML): the DAG helpers import them
LIGHT = {"genre_tasks", "genre_tasks.config", "genre_tasks.schema", "genre_airflow", "genre_airflow.triggers"}
heavy = [m for m in ("pandas", "torch", "mlflow", "great_expectations", "dvc") if m in sys.modules]
heavy += sorted(m for m in sys.modules if m.startswith("genre_tasks") and m not in LIGHT)
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "tasks": {t.task_id: {"retries": t.retries, "trigger_rule": getattr(t.trigger_rule, "value", str(t.trigger_rule)),
                          "outlets": [getattr(o, "uri", str(o)) for o in t.outlets],
                          "owner": t.owner, "upstream": sorted(t.upstream_task_ids)} for t in dag.tasks},
    "tags": sorted(dag.tags), "catchup": dag.catchup, "max_active_runs": dag.max_active_runs,
    "timetable": str(dag.timetable), "doc": bool(dag.doc_md), "heavy": heavy,
    "params": sorted(dag.params.keys()),
}))
"""
    env = {**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False", **(env_extra or {})}
    env.setdefault("AIRFLOW_HOME", str(Path("/tmp") / f"genre-dagtest-{os.getuid()}"))
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "dags" / "genre_feedback.py")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dag_integrity(tmp_path):
    info = _parse_in_subprocess({"AIRFLOW_HOME": str(tmp_path / "af")})
    assert info["errors"] == {}
    assert info["heavy"] == []  # no pandas / mlflow / dvc, no genre_tasks beyond config+schema
    tasks = info["tasks"]
    assert list(tasks) == ["list_batches", "validate_batch", "prequential", "apply_batches",
                           "record_store", "report"]
    assert tasks["validate_batch"]["retries"] == 0 and tasks["record_store"]["retries"] >= 2
    assert tasks["record_store"]["outlets"] == ["genre://interactions/store"]
    assert tasks["report"]["trigger_rule"] == "all_done"
    # prequential scores beside apply, off the path to the asset event
    assert tasks["prequential"]["upstream"] == tasks["apply_batches"]["upstream"] == ["validate_batch"]
    assert tasks["record_store"]["upstream"] == ["apply_batches"]
    assert all(t["owner"] == "genre-mlops" for t in tasks.values())
    assert info["catchup"] is False and info["max_active_runs"] == 1 and info["doc"]
    assert "*/15 * * * *" in info["timetable"] and "feedback" in info["tags"]
    # event-driven: a watcher on the landing folder (cron above is the fallback)
    assert "LandingFolderTrigger" in info["timetable"] and "genre://feedback/landing" in info["timetable"]
    assert info["params"] == ["allow_new_items", "dvc_push", "prequential"]
    manual = _parse_in_subprocess({"AIRFLOW_HOME": str(tmp_path / "af"),
                                   "GENRE_FEEDBACK_SCHEDULE": "none"})
    # GENRE_FEEDBACK_SCHEDULE=none: no timer, the landing-folder watcher only
    assert manual["timetable"].startswith("AssetTriggeredTimetable") and "*/15" not in manual["timetable"]


# --- end to end -------------------------------------------------------------------------------
def _feedback_dag_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("genre_feedback_dag", ROOT / "dags" / "genre_feedback.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("form, in_params, expected", [
    ({}, False, False),                       # empty form: params.yaml's false holds
    ({"prequential": None}, False, False),
    ({"prequential": None}, True, True),
    ({"prequential": True}, False, True),     # an explicit choice wins
    ({"prequential": False}, True, False),
])
def test_prequential_form_defaults_to_params_yaml(monkeypatch, tmp_path, form, in_params, expected):
    from genre_tasks import feedback

    dag_module = _feedback_dag_module()
    assert dag_module.PARAMS["prequential"].value is None  # the form's default is "as in params.yaml"
    assert dag_module.PARAMS["dvc_push"].value is None
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["feedback"]["prequential"] = in_params
    seen = {}

    def fake_prequential(params_, paths, good, logical_date, *, enabled=None):
        # what genre_tasks.feedback.prequential decides from params + the form's value
        seen["enabled"] = feedback.settings(params_, prequential=enabled).feedback.prequential
        return {"enabled": seen["enabled"]}

    monkeypatch.setattr(dag_module, "get_current_context", lambda: {"params": form})
    monkeypatch.setattr(dag_module, "_run_context", lambda: (params, tmp_path, "2026-01-01T00:00:00+00:00"))
    monkeypatch.setattr(feedback, "prequential", fake_prequential)
    monkeypatch.setenv("GENRE_PROJECT_ROOT", str(tmp_path))
    dag_module.prequential.function([{"batch_id": "b1", "status": "valid"}])
    assert seen["enabled"] is expected


def test_dvc_push_form_defaults_to_params_yaml(monkeypatch, tmp_path):
    from genre_tasks import feedback

    dag_module = _feedback_dag_module()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["feedback"]["dvc_push"] = False
    seen = {}

    def fake_record(params_, paths, *, dvc=None, push=None):
        seen["push"] = feedback.settings(params_, dvc_push=push).feedback.dvc_push
        return {}

    events: dict = {dag_module.INTERACTIONS: type("Event", (), {"extra": None})()}
    monkeypatch.setattr(dag_module, "get_current_context",
                        lambda: {"params": {"dvc_push": None}, "outlet_events": events})
    monkeypatch.setattr(dag_module, "_run_context", lambda: (params, tmp_path, "2026-01-01T00:00:00+00:00"))
    monkeypatch.setattr(feedback, "record_store", fake_record)
    monkeypatch.setenv("GENRE_PROJECT_ROOT", str(tmp_path))
    dag_module.record_store.function({"unrecorded": ["b1"]})
    assert seen["push"] is False
    assert events[dag_module.INTERACTIONS].extra == dict.fromkeys(("batches", "rows", "store_batches", "dvc", "source_md5"))
    # nothing applied: skipped (no DVC record, no asset event), DVC never called
    seen.clear()
    from airflow.sdk.exceptions import AirflowSkipException

    with pytest.raises(AirflowSkipException):
        dag_module.record_store.function({"unrecorded": []})
    assert seen == {}


#: GENRE_E2E_SIZE=full: the scratch project holds all of MovieLens-100k before the cutoff with
#: params.yaml's models (a fusion champion, ~3 min to build) instead of 30 users and EASE
FULL_SIZE = os.environ.get("GENRE_E2E_SIZE", "tiny") == "full"


def sh(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Scratch project with a @champion trained on the initial store, a DVC repo + remote and
    two batches in the landing folder (1998-W10 and a corrupted copy of 1998-W11)."""
    from genre_tasks import cli
    from genre_tasks.feedback import replay
    from genre_tasks.registry import tracking_store
    from genre_tasks.config import deep_merge
    from genre_tasks.schema import Paths

    root = tmp_path_factory.mktemp("feedback-e2e")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if FULL_SIZE:  # MovieLens-100k as params.yaml has it (the scheduler test's latency figure)
        params = deep_merge(params, {"ingest": {"until": replay.DEFAULT_CUTOFF}, "embed": {"show_progress": False}})
    else:
        params = deep_merge(params, yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()))
        params = deep_merge(params, {
            "ingest": {"max_users": 30, "until": replay.DEFAULT_CUTOFF},
            # EASE as the strategy: a champion that is not worse than the best baseline (the
            # gate's floor refuses even a forced model significantly below it), in seconds
            "train": {"strategies": ["ease"]},
        })
    params = deep_merge(params, {"feedback": {"dvc_push": True}})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "HF_HUB_OFFLINE": "1",
           "GENRE_PROJECT_ROOT": str(root), "PYTHONPATH": str(ROOT),
           "AIRFLOW_HOME": str(root / "airflow_home"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{root}/airflow_home/airflow.db",
           "AIRFLOW__CORE__PARALLELISM": "2"}
    env.pop("GENRE_PARAMS_OVERRIDE", None)
    env.pop("GENRE_MLFLOW_RUN_ID", None)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "GENRE_MLFLOW_RUN_ID")}
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    os.environ.pop("GENRE_MLFLOW_RUN_ID", None)
    try:
        # the initial champion (forced: on 30 users EASE need not beat the other baselines significantly)
        forced = deep_merge(params, {"promote": {"force": True}})
        tracking_store.init_store(Paths(root))
        for stage in cli.STAGES:
            cli.run_stage(stage, forced, root,
                          **({"reason": "e2e fixture: the first champion"} if stage == "promote" else {}))
        # DVC: the project's dvc.yaml, stage source's code dependency, a local remote
        shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
        (root / "genre_tasks" / "data").mkdir(parents=True)
        shutil.copy(ROOT / "genre_tasks" / "data" / "source.py", root / "genre_tasks" / "data" / "source.py")
        sh(["git", "init", "-q"], root, env)
        sh([sys.executable, "-m", "dvc", "init", "-q"], root, env)
        sh([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(root / "remote")], root, env)
        paths = Paths(root)
        replay.init(params, paths)
        replay.next_batch(params, paths)
        replay.next_batch(params, paths, corrupt=True)
        sh(["airflow", "db", "migrate"], root, env)
        yield root, env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def asset_events(root: Path) -> list[dict]:
    with sqlite3.connect(root / "airflow_home" / "airflow.db") as db:
        rows = db.execute("SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
                          "WHERE a.uri = 'genre://interactions/store' ORDER BY e.id").fetchall()
    return [json.loads(r[0]) if isinstance(r[0], str) else r[0] for r in rows]


@pytest.mark.e2e
@pytest.mark.slow
def test_feedback_dag_end_to_end(project):
    from genre_tasks import io
    from genre_tasks.data import adapters
    from genre_tasks.feedback import FeedbackPaths
    from genre_tasks.schema import Paths

    root, env = project
    paths = Paths(root)
    fp = FeedbackPaths(paths)
    out = sh(["airflow", "dags", "test", "genre_feedback", "2026-11-23T14:00:00+00:00"], root, env)
    assert "state=success" in out and "DagRun Finished" in out, out[-3000:]

    assert sorted(adapters.read_ledger(paths.source)) == ["1998-W10"]
    assert (fp.quarantine / "1998-W11-corrupt" / "report.json").exists()
    assert "rating is between 0 and 5" in (fp.quarantine / "1998-W11-corrupt" / "message.txt").read_text()
    pre = io.read_json(fp.prequential / "1998-W10.json")
    assert pre["model_version"] == "1" and pre["counts"]["eval_users"] > 0
    assert 0.0 <= pre["metrics"]["ndcg@10"] <= 1.0 and 0.0 <= pre["metrics"]["auc"] <= 1.0
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    md5 = lock["stages"]["source"]["outs"][0]["md5"]
    events = asset_events(root)
    assert len(events) == 1 and events[0]["batches"] == ["1998-W10"]
    assert events[0]["dvc"] == "pushed" and events[0]["source_md5"] == md5
    assert not list(fp.incoming.iterdir())

    # nothing new: the DVC and asset tasks are skipped, no second asset event
    out = sh(["airflow", "dags", "test", "genre_feedback", "2026-11-23T14:15:00+00:00"], root, env)
    assert "state=success" in out
    assert len(asset_events(root)) == 1
    assert yaml.safe_load((root / "dvc.lock").read_text())["stages"]["source"]["outs"][0]["md5"] == md5
