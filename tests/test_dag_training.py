"""End-to-end runs of the genre_training DAG with `airflow dags test`, in scratch project copies.

Each test copies dvc.yaml, params.yaml, configs/, genre_tasks/, dags/ and scripts/ into tmp, with
AIRFLOW_HOME and the MLflow tracking database in tmp too, and runs the DAG through
scripts/airflow.sh (the same entry point `make airflow-train` uses):

* a small slice of MovieLens-100k (configs/tiny.yaml + 40 users, content only, 2 epochs,
  forced promotion): every task succeeds, the registry has a ``@champion``, the MLflow run of
  the DAG run is tagged with the Airflow run and finished;
* a tabular dataset with a rating of 9.5: validate fails with the Great Expectations summary in
  its task log, nothing after it runs, the MLflow run is marked FAILED by the teardown.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DAG_ID = "genre_training"
COPY = ("dvc.yaml", "params.yaml", "configs", "genre_tasks", "dags", "scripts", ".dvc", ".dvcignore")
STAGES = ("ingest", "validate", "preprocess", "augment", "embed", "genre", "train", "evaluate", "promote")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def scratch_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, project / name)
    (project / ".dvc" / "config.local").unlink(missing_ok=True)  # the default local remote only
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    return project


def airflow_env(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "GENRE_", "MLFLOW_"))}
    env.update({
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        "GENRE_PROJECT_ROOT": str(project),
        "GENRE_PARAMS_OVERRIDE": "configs/tiny.yaml",  # resolved against the project root
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
    })
    return env


def airflow(project: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(project / "scripts" / "airflow.sh"), *args], cwd=project,
                          env=airflow_env(project), capture_output=True, text=True, timeout=timeout)


def run_dag(project: Path, conf: dict) -> tuple[subprocess.CompletedProcess, str, dict[str, str]]:
    """`airflow dags test` with ``conf``; returns (process, run id, {task id: state}). The run
    and its task states are read from the metadata DB (each `airflow` CLI call costs a start-up);
    a mapped task's instances must agree, or its entry is the sorted list of their states."""
    db = project / "airflow_home" / "airflow.db"
    if not db.exists():
        init = airflow(project, "init")
        assert init.returncode == 0, init.stderr[-3000:]
    proc = airflow(project, "dags", "test", DAG_ID, "--conf", json.dumps(conf))
    with contextlib.closing(sqlite3.connect(db)) as con:
        row = con.execute("SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1",
                          (DAG_ID,)).fetchone()
        assert row, f"no {DAG_ID} run in {db}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        rows = con.execute("SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?",
                           (DAG_ID, row[0])).fetchall()
    states: dict[str, set] = {}
    for task, state in rows:
        states.setdefault(task, set()).add(state)
    return proc, row[0], {t: next(iter(s)) if len(s) == 1 else sorted(s, key=str) for t, s in states.items()}


def mlflow_run_of(project: Path, run_id: str):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("genre-mlops")
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`airflow.run_id` = '{run_id}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def test_training_dag_end_to_end_promotes_a_champion(tmp_path):
    project = scratch_project(tmp_path)
    # EASE as the strategy: a forced promotion still has to pass the floor (not significantly
    # worse than the best baseline), which a 2-epoch neural model on 40 users does not
    # embed scaled out to 2 mapped shard tasks (not a DVC param of embed: the second trigger
    # below still finds every stage in the run-cache)
    conf = {"max_users": 40, "strategies": ["ease"], "epochs": 2, "force_promote": True,
            "force_reason": "e2e test: the first champion", "overrides": {"embed": {"shards": 2}}}
    proc, run_id, states = run_dag(project, conf)
    assert states == {t: "success" for t in ("start_mlflow_run", "snapshot_params", *STAGES,
                                             "embed_plan", "embed_shard", "finish_mlflow_run")}, \
        f"{states}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    client, run = mlflow_run_of(project, run_id)
    assert run.data.tags["airflow.dag_id"] == DAG_ID
    assert run.data.tags["airflow.grid_url"].startswith("http://127.0.0.1:")
    assert run.data.tags["airflow.outcome"] == "success"
    assert run.info.status == "FINISHED"
    champion = client.get_model_version_by_alias("genre-recommender", "champion")
    assert champion.run_id == run.info.run_id  # promote logged into the DAG run's MLflow run
    assert champion.tags["decision"] == "forced"
    promote = json.loads((project / "metrics" / "promote.json").read_text())
    assert promote["decision"] == "forced" and str(promote["champion_version"]) == str(champion.version)
    assert champion.tags["force_reason"] == conf["force_reason"]
    assert promote["best_baseline"] in json.loads((project / "metrics" / "evaluate.json").read_text())["models"]
    train = json.loads((project / "metrics" / "train.json").read_text())
    assert "ease" in json.dumps(train)

    # the run ran through DVC in its own workspace: clean `dvc status` there, its params
    # snapshot and dvc.lock in the MLflow run, per-stage records logged as it went
    workspace = Path(run.data.tags["genre.workspace"])
    assert workspace.parent == project / "runs"
    status = subprocess.run(["dvc", "status"], cwd=workspace, capture_output=True, text=True,
                            env=airflow_env(project))
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
    snapshot = yaml.safe_load((workspace / "params.yaml").read_text())
    assert snapshot["train"]["epochs"] == 2 and snapshot["ingest"]["max_users"] == 40
    # the two shards encoded every text and uploaded their parts; the embed stage encoded none
    assert snapshot["embed"]["shards"] == 2
    parts = sorted(a.path for a in client.list_artifacts(run.info.run_id, "embed_shards"))
    assert parts == ["embed_shards/part-0000-of-0002.npz", "embed_shards/part-0001-of-0002.npz"], parts
    embedded = json.loads((workspace / "metrics" / "embed.json").read_text())
    assert embedded["n_texts_encoded"] == 0 and embedded["n_cached"] == embedded["n_items"] > 0, embedded
    assert snapshot["embed"]["batch_size"] == 32  # configs/tiny.yaml ($GENRE_PARAMS_OVERRIDE)
    assert run.data.params["train.epochs"] == "2"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "run")}
    assert artifacts == {"run/params.yaml", "run/dvc.lock", "run/dvc.yaml"}
    assert run.data.tags["genre.last_stage"] == "promote"
    assert all(run.data.tags[f"genre.stage.{s}"] == "computed" for s in ("ingest", "train", "evaluate"))
    history = client.get_metric_history(run.info.run_id, "live.ease.valid.valid_ndcg_at_10")
    # logged live while training, one step per value of the ease strategy's lambda grid
    assert [m.step for m in history] == list(range(1, len(snapshot["train"]["ease_lambda"]) + 1))
    # ... and published into the project: dvc.lock + outputs, promote's metrics at the root
    assert (project / "dvc.lock").exists() and (project / "data" / "model" / "ease").is_dir()

    # the same trigger again: every stage is skipped or restored from the DVC run-cache (promote
    # too: nothing it depends on changed, and no registry write happens without it computing)
    proc2, run_id2, states2 = run_dag(project, conf)
    assert run_id2 != run_id and set(states2.values()) == {"success"}, states2
    out = proc2.stdout + proc2.stderr
    assert re.findall(r"Running stage '([\w-]+)'", out) == [], out[-3000:]
    assert out.count(": run-cache in ") == len(STAGES)  # ingest..promote; source is pulled

    # the version trained through Airflow: its lineage, and its data + model restored elsewhere
    genre = [str(Path(sys.executable).parent / "genre"), "--root", str(project)]
    lineage = subprocess.run([*genre, "lineage", str(champion.version)], cwd=project, capture_output=True,
                             text=True, env=airflow_env(project))
    assert lineage.returncode == 0, lineage.stderr[-3000:]
    record = json.loads(lineage.stdout)
    assert record["params"] == snapshot and record["problems"] == []
    assert record["gx"]["expectations_evaluated"] == record["gx"]["expectations_successful"] > 0
    assert record["dvc_lock"]["train"]["data/model"].endswith(".dir") and "test.ndcg_at_10" in record["metrics"]
    restored = tmp_path / "restored"
    checkout = subprocess.run([*genre, "checkout", str(champion.version), "--dir", str(restored)], cwd=project,
                              capture_output=True, text=True, env=airflow_env(project))
    assert checkout.returncode == 0, checkout.stdout[-3000:] + checkout.stderr[-3000:]
    result = json.loads(checkout.stdout)
    assert result["ok"] and result["model_md5"] == record["dvc_lock"]["train"]["data/model"]
    model_files = sorted(p.relative_to(workspace) for p in (workspace / "data" / "model").rglob("*") if p.is_file())
    assert model_files and all((restored / f).read_bytes() == (workspace / f).read_bytes() for f in model_files)
    # a version that does not exist: a clear refusal naming what there is, no traceback
    missing = subprocess.run([*genre, "lineage", "99"], cwd=project, capture_output=True, text=True,
                             env=airflow_env(project))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr, missing.stderr[-2000:]
    assert "has no version or alias '99'" in missing.stderr and f"versions {champion.version}" in missing.stderr


def test_failed_validation_fails_the_run_and_stops_downstream(tmp_path):
    project = scratch_project(tmp_path)
    source = project / "data" / "source"
    source.mkdir(parents=True)
    (source / "items.csv").write_text("item_id,title,genres\na,Alpha,Drama|Comedy\nb,Beta,Sci-Fi\n"
                                      "c,Gamma,Drama\n")
    (source / "interactions.csv").write_text(
        "user_id,item_id,timestamp,rating\nu1,a,1000000000,4\nu1,b,1000000100,9.5\n"
        "u2,a,1000000200,3\nu2,c,1000000300,5\n")
    proc, run_id, states = run_dag(project, {"adapter": "tabular"})
    assert states["start_mlflow_run"] == "success" and states["ingest"] == "success"
    assert states["validate"] == "failed", f"{states}\n{proc.stdout[-3000:]}"
    for stage in STAGES[2:]:
        assert states[stage] == "upstream_failed", (stage, states)
    assert states["finish_mlflow_run"] == "success"  # teardown closes the MLflow run
    assert "state=failed" in proc.stdout + proc.stderr  # the DAG run failed

    # `dags test` runs the tasks in-process: their logs are in its output, task by task
    out = proc.stdout + proc.stderr
    assert out.count("[DAG TEST] starting task_id=validate ") == 1  # not retried
    validate_log = out.split("[DAG TEST] starting task_id=validate ")[1].split("[DAG TEST] end task")[0]
    assert "data validation failed" in validate_log
    assert "rating is between 0 and 5" in validate_log and "9.5" in validate_log  # GX summary
    assert not (project / "data" / "processed").exists()

    _, run = mlflow_run_of(project, run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["airflow.outcome"].startswith("failed: validate (not run: ")
    # ... and says how far it got: ingest done (and logged), validate failed
    assert run.data.tags["genre.last_stage"] == "ingest"
    assert run.data.tags["genre.stage.validate"] == "failed"
    assert run.data.metrics["ingest.n_interactions"] == 4
