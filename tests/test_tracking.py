"""tracking: where runs go, lineage hashes, one run per pipeline run with nested strategy runs."""
from __future__ import annotations

import os

import numpy as np
import pytest

from genre_tasks import io
from genre_tasks import schema as S
from genre_tasks.registry import provenance, stage_logging, tracking, tracking_store
from test_promote import mlflow_db, params_dict, project, tracking_env, trained_project  # noqa: F401


def test_tracking_uri_experiment_and_artifact_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("GENRE_MLFLOW_ARTIFACTS", raising=False)
    paths = S.Paths(tmp_path)
    assert tracking_store.tracking_uri(paths) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_store.artifact_location(paths) == (tmp_path / "mlartifacts").resolve().as_uri()
    assert tracking_store.experiment_name() == "genre-mlops"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "other")
    assert tracking_store.tracking_uri(paths) == "http://127.0.0.1:5000" and tracking_store.experiment_name() == "other"
    assert tracking_store.artifact_location(paths) is None  # the server decides
    monkeypatch.setenv("GENRE_MLFLOW_ARTIFACTS", str(tmp_path / "store"))
    assert tracking_store.artifact_location(paths) == (tmp_path / "store").resolve().as_uri()


def test_params_hash_is_canonical():
    a = {"train": {"dim": 64, "lr": 0.003}, "promote": {"seed": 42}}
    b = {"promote": {"seed": 42}, "train": {"lr": 0.003, "dim": 64}}
    assert provenance.params_hash(a) == provenance.params_hash(b) and len(provenance.params_hash(a)) == 64
    assert provenance.params_hash(a) != provenance.params_hash({**a, "promote": {"seed": 43}})


def test_metric_keys_are_mlflow_safe():
    assert tracking.metric_key("ndcg@10") == "ndcg_at_10"
    assert tracking.metric_key("test.content.imp_ndcg@5") == "test.content.imp_ndcg_at_5"
    assert tracking.flatten({"a": {"b": 1, "c": [1, 2]}}) == {"a.b": 1, "a.c": [1, 2]}
    assert tracking.numeric(True) is None and tracking.numeric(float("nan")) is None and tracking.numeric("0.5") == 0.5


def test_git_commit_outside_a_repository_is_unknown(tmp_path):
    assert provenance.git_commit(tmp_path) == "unknown"


def test_data_hashes_from_files_and_dvc_lock(tmp_path_factory, tmp_path):
    import shutil

    src = trained_project(tmp_path_factory.getbasetemp())
    paths = S.Paths(tmp_path / "p")
    shutil.copytree(src, paths.root)
    # with a train record: the hashes of what train read, even after the files changed since
    trained = provenance.data_hashes(paths)
    assert trained["data/processed/items.parquet"] == io.file_md5(paths.items)
    io.save_npy(np.zeros((3, 2), np.float32), paths.vectors)
    assert provenance.data_hashes(paths) == trained != {**trained,
                                                        "data/embeddings/vectors.npy": io.file_md5(paths.vectors)}
    # without one (nothing trained yet): dvc.lock + the bytes of the key files
    (paths.root / "data" / "manifests" / "train.json").unlink()
    shutil.copy(src / "data" / "embeddings" / "vectors.npy", paths.vectors)
    hashes = provenance.data_hashes(paths)
    assert hashes["data/processed/items.parquet"] == io.file_md5(paths.items)
    assert hashes["data/embeddings/vectors.npy"] == io.file_md5(paths.vectors)
    assert "data/embeddings" not in hashes
    (paths.root / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  embed:\n    cmd: genre embed\n    outs:\n"
        "    - path: data/embeddings\n      hash: md5\n      md5: abc123.dir\n      size: 10\n"
        "    - path: data/processed/items.parquet\n      hash: md5\n      md5: stale\n      size: 1\n")
    with_lock = provenance.data_hashes(paths)
    assert with_lock["data/embeddings"] == "abc123.dir"
    # the bytes on disk win over a stale lock entry for the key data files
    assert with_lock["data/processed/items.parquet"] == io.file_md5(paths.items)
    tags = provenance.lineage_tags(paths, {"a": 1})
    assert tags["data.data/embeddings"] == "abc123.dir" and tags["split_mode"] == "user_temporal"
    assert tags["data_hash"] == provenance.combined_hash(with_lock) != provenance.combined_hash(hashes)


@pytest.mark.slow
def test_pipeline_run_logs_params_curves_metrics_artifacts_and_lineage(project):
    import mlflow

    params = params_dict()
    with tracking.pipeline_run(project, params) as run_id:
        assert mlflow.active_run().info.run_id == run_id
        summary = stage_logging.log_pipeline(run_id, project, params)
    assert mlflow.active_run() is None
    cl = tracking_store.client(project)
    run = cl.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert cl.get_experiment(run.info.experiment_id).name == "genre-mlops"
    # params.yaml flattened
    assert run.data.params["train.dim"] == str(params["train"]["dim"])
    assert run.data.params["promote.guardrails.auc"] == str(params["promote"]["guardrails"]["auc"])
    # test metrics per model, and the selected model's without prefix
    m = run.data.metrics
    assert "test.content.ndcg_at_10" in m and "test.MostPop.ndcg_at_10" in m
    assert m["test.ndcg_at_10"] == m["test.content.ndcg_at_10"]
    assert "train.strategies.content.valid_ndcg_at_10" in m
    # lineage tags
    t = run.data.tags
    assert t["params_hash"] == provenance.params_hash(params) and t["git_commit"]
    assert t["data_hash"] == provenance.combined_hash(provenance.data_hashes(project))
    assert t["data.data/processed/interactions.parquet"] == io.file_md5(project.interactions)
    assert t["split_mode"] == "user_temporal"
    # artifacts
    arts = {f.path for d in ("evaluation", "training", "validation", "metrics")
            for f in cl.list_artifacts(run_id, d)}
    for name in ("evaluation/comparison.md", "evaluation/comparison.png", "training/train_curve.png",
                 "validation/summary.json", "metrics/evaluate.json", "metrics/train.json"):
        assert name in arts, (name, sorted(arts))
    # dataset inputs with their contexts and DVC md5
    inputs = {(d.dataset.name, {x.key: x.value for x in d.tags}["mlflow.data.context"])
              for d in run.inputs.dataset_inputs}
    assert {("interactions-trainvalid", "training"), ("interactions-test", "test"), ("items", "training")} <= inputs
    digest = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert digest["interactions-test"].startswith(io.file_md5(project.interactions)[:10])
    # the profile counts every row (the schema is inferred from the first rows only)
    import json

    import pandas as pd

    inter = pd.read_parquet(project.interactions)
    ds = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert json.loads(ds["interactions-test"].profile)["num_rows"] == int((inter["split"] == "test").sum())
    cols = {c["name"] for c in json.loads(ds["interactions-test"].schema)["mlflow_colspec"]}
    assert {"user_id", "item_id", "split"} <= cols
    # one nested child run per strategy, per-epoch metrics with epoch steps
    child = cl.get_run(summary["children"]["content"])
    assert child.data.tags["mlflow.parentRunId"] == run_id
    curve = (project.model_dir / "content" / "curve.csv").read_text().strip().splitlines()
    history = cl.get_metric_history(child.info.run_id, "valid_ndcg_at_10")
    assert [h.step for h in history] == list(range(1, len(curve)))
    assert child.data.tags["genre.selected"] == "true"


@pytest.mark.slow
def test_resumes_the_env_run_ends_stale_runs_and_is_idempotent(project, monkeypatch):
    import mlflow

    tracking_store.configure(project)
    airflow_run = tracking_store.client(project).create_run(mlflow.get_experiment_by_name("genre-mlops").experiment_id,
                                               run_name="dag-run").info.run_id
    monkeypatch.setenv("GENRE_MLFLOW_RUN_ID", airflow_run)
    mlflow.start_run()  # a stale run left active in this process
    stale = mlflow.active_run().info.run_id
    for _ in range(2):  # e.g. an Airflow retry of the task
        with tracking.pipeline_run(project, params_dict()) as run_id:
            assert run_id == airflow_run
            stage_logging.log_pipeline(run_id, project, params_dict())
    cl = tracking_store.client(project)
    assert cl.get_run(stale).info.status == "FINISHED"
    children = cl.search_runs([cl.get_run(airflow_run).info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{airflow_run}'")
    assert len(children) == 1  # not duplicated by the second pass
    history = cl.get_metric_history(children[0].info.run_id, "train_loss")
    assert len(history) == len({h.step for h in history})


@pytest.mark.slow
def test_promote_does_not_log_again_what_the_stage_tasks_logged_live(project, monkeypatch):
    """An Airflow run: every stage task logged its stage into the run (log_stage) and
    snapshot_params the params; promote's log_pipeline then adds only the metrics files -- no
    second set of lineage inputs, child runs, params or test metrics."""
    import mlflow

    tracking_store.configure(project)
    cl = tracking_store.client(project)
    run_id = cl.create_run(mlflow.get_experiment_by_name("genre-mlops").experiment_id).info.run_id
    cl.set_tag(run_id, "genre.params_hash", "snapshot")  # as snapshot_params does
    for stage in ("validate", "preprocess", "train", "evaluate"):
        stage_logging.log_stage(run_id, stage, project, "computed", 1.0)
    before = cl.get_run(run_id)
    calls = []
    monkeypatch.setattr(stage_logging, "log_params", lambda *a, **k: calls.append("params"))
    monkeypatch.setattr(stage_logging, "log_training", lambda *a, **k: calls.append("training"))
    monkeypatch.setattr(stage_logging, "log_evaluation", lambda *a, **k: calls.append("evaluation"))
    monkeypatch.setattr(stage_logging, "log_lineage", lambda *a, **k: calls.append("lineage"))
    summary = stage_logging.log_pipeline(run_id, project, params_dict())
    assert calls == [] and summary["logged_live"] == ["evaluate", "preprocess", "train", "validate"]
    after = cl.get_run(run_id)
    assert len(after.inputs.dataset_inputs) == len(before.inputs.dataset_inputs) > 0
    assert after.data.metrics == before.data.metrics
    assert {"metrics/train.json", "metrics/evaluate.json"} <= {f.path for f in cl.list_artifacts(run_id, "metrics")}
    # a failed stage is not "logged": promote after a retry would log it here
    cl.set_tag(run_id, "genre.stage.train", "failed")
    stage_logging.log_pipeline(run_id, project, params_dict())
    assert calls == ["training"]


@pytest.mark.slow
def test_a_failing_block_marks_the_run_failed(project):
    with pytest.raises(ValueError):
        with tracking.pipeline_run(project) as run_id:
            raise ValueError("boom")
    assert tracking_store.client(project).get_run(run_id).info.status == "FAILED"
    assert os.environ.get("GENRE_MLFLOW_RUN_ID") is None


@pytest.mark.slow
def test_search_trials_are_child_runs_of_their_strategy_run(project):
    record = io.read_json(project.metrics("train"))
    trials = [{"trial": i, "values": {"lr": lr}, "valid_ndcg@10": v, "best_epoch": 2, "epochs_run": 3,
               "seconds": 1.5} for i, (lr, v) in enumerate([(0.005, 0.10), (0.01, 0.12)])]
    record["strategies"]["content"]["search"] = {"chosen": 1, "grid_size": 3, "trials": trials}
    io.write_json(record, project.metrics("train"))
    with tracking.pipeline_run(project, params_dict()) as run_id:
        children = stage_logging.log_training(run_id, project)
        again = stage_logging.log_training(run_id, project)  # idempotent: no second set of trial runs
    assert children == again
    cl = tracking_store.client(project)
    parent = cl.get_run(children["content"])
    runs = cl.search_runs([parent.info.experiment_id],
                          filter_string=f"tags.`mlflow.parentRunId` = '{children['content']}'")
    by_trial = {r.data.tags[stage_logging.TRIAL_TAG]: r for r in runs}
    assert sorted(by_trial) == ["0", "1"]
    assert by_trial["1"].data.params["lr"] == "0.01" and by_trial["1"].data.metrics["valid_ndcg_at_10"] == 0.12
    assert by_trial["1"].data.tags["genre.search_chosen"] == "true"
    assert by_trial["0"].data.tags["genre.search_chosen"] == "false"
    assert all(r.info.status == "FINISHED" for r in runs)
