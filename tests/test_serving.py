"""serving: the pyfunc contract, self-containment (fresh process, no project data), re-scoring."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from genre_tasks.models import views as D
from genre_tasks import schema as S
from test_promote import (  # noqa: F401
    mlflow_db,
    model_name,
    project,
    promote,
    tracking_env,
    trained_project,
)


@pytest.fixture
def bundle_model(tmp_path, tmp_path_factory):
    """A GenreRecommenderModel loaded straight from a bundle (no MLflow involved)."""
    from genre_tasks.registry import serving

    paths = S.Paths(trained_project(tmp_path_factory.getbasetemp()))
    ds = D.Dataset.load(paths)
    fit, _ = ds.phase("test")
    bundle = serving.build_bundle(paths.model_dir / "content", fit, ds.items[S.TITLE].tolist(),
                                  tmp_path / "bundle")
    return serving.GenreRecommenderModel().load_bundle(bundle), fit, paths


def test_predict_contract(bundle_model):
    model, fit, _ = bundle_model
    ids = [str(i) for i in fit.item_ids]
    hist = ids[:3]
    out = model.predict(None, pd.DataFrame({"history": [hist, [], ["nope", ids[5]]], "k": [5, 4, 3]}))
    assert list(out.columns) == ["item_ids", "scores"] and len(out) == 3
    top, scores = out["item_ids"][0], out["scores"][0]
    assert len(top) == 5 and not set(top) & set(hist)  # history excluded
    assert scores == sorted(scores, reverse=True) and all(isinstance(s, float) for s in scores)
    # empty history: the most popular items
    pop_order = [ids[i] for i in np.lexsort((np.arange(fit.n_items), -fit.popularity))]
    assert out["item_ids"][1] == pop_order[:4]
    # unknown ids are ignored: same answer as without them
    alone = model.predict(None, pd.DataFrame({"history": [[ids[5]]], "k": [3]}))
    assert out["item_ids"][2] == alone["item_ids"][0] and ids[5] not in out["item_ids"][2]
    # k larger than what is left: everything not in the history
    many = model.predict(None, pd.DataFrame({"history": [hist], "k": [10_000]}))
    assert len(many["item_ids"][0]) == fit.n_items - 3


def test_timestamps_order_the_history_and_k_defaults(bundle_model):
    model, fit, _ = bundle_model
    ids = [str(i) for i in fit.item_ids]
    ordered = model.predict(None, pd.DataFrame({"history": [[ids[1], ids[7], ids[20]]]}))
    shuffled = model.predict(None, pd.DataFrame({"history": [[ids[20], ids[1], ids[7]]],
                                                 "timestamps": [[30, 10, 20]]}))
    assert len(ordered["item_ids"][0]) == 10  # default k
    assert ordered["item_ids"][0] == shuffled["item_ids"][0]
    np.testing.assert_allclose(ordered["scores"][0], shuffled["scores"][0], rtol=1e-6)


def test_rescore_matches_the_trained_model_on_the_project_catalogue(bundle_model):
    from genre_tasks.models import train

    model, fit, paths = bundle_model
    rec = train.load_recommender(paths.model_dir / "content")
    hist = [fit.histories[u] for u in range(5)]
    np.testing.assert_allclose(model.recommender.score(hist, fit), rec.score(hist, fit), rtol=1e-5)
    # and on a smaller, re-ordered catalogue (the model maps items by id)
    keep = np.arange(fit.n_items)[::-1][: fit.n_items // 2]
    sub = D.FitData(**{**fit.__dict__, "n_items": len(keep), "item_ids": fit.item_ids[keep],
                       "item_vectors": fit.item_vectors[keep], "item_genres": fit.item_genres[keep],
                       "popularity": fit.popularity[keep], "timestamps": fit.timestamps[keep]})
    s = model.score([np.array([0, 1])], sub)
    assert s.shape == (1, len(keep)) and np.isfinite(s).all()


def test_explain_names_the_closest_history_item_and_shared_genres(bundle_model):
    model, fit, _ = bundle_model
    items = model.items
    horror = items.index[items[S.GENRES].map(lambda g: "Horror" in g)].tolist()
    hist = [str(items[S.ITEM_ID][i]) for i in horror[:3]]
    rec = str(items[S.ITEM_ID][horror[3]])
    (reason,) = model.explain(hist, [rec])
    assert reason.startswith("like '") and "shared genres: Horror" in reason
    assert model.explain([], [rec]) == ["popular with everyone"]


def test_pip_requirements_are_pinned_without_local_labels():
    from genre_tasks.registry import serving

    reqs = serving.pip_requirements()
    assert "torch==2.13.0" in reqs and any(r.startswith("mlflow==") for r in reqs)
    assert all("==" in r and "+" not in r for r in reqs)


@pytest.mark.slow
def test_log_model_in_a_run_with_many_metrics_reads_no_metric_history(project, monkeypatch, tmp_path):
    """MLflow 3 would link every metric of the active run to the new model with one get-history
    request each (minutes through a server); the model is logged outside the run and linked to it
    once: still the run's output, in the run's experiment, and the run stays active."""
    import mlflow

    from genre_tasks.registry import serving
    from genre_tasks.registry import tracking, tracking_store

    ds = D.Dataset.load(project)
    fit, _ = ds.phase("test")
    calls = []
    real = mlflow.MlflowClient.get_metric_history
    monkeypatch.setattr(mlflow.MlflowClient, "get_metric_history",
                        lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    with tracking.pipeline_run(project, {"test": 1}) as run_id:
        mlflow.log_metrics({f"test.m{i}": float(i) for i in range(40)})
        info = serving.log_model(project.model_dir / "content", fit, ds.items[S.TITLE].tolist(), tmp_path)
        assert mlflow.active_run().info.run_id == run_id
    assert calls == []
    client = tracking_store.client(project)
    run = client.get_run(run_id)
    assert [o.model_id for o in run.outputs.model_outputs] == [info.model_id]
    assert client.get_logged_model(info.model_id).experiment_id == run.info.experiment_id


@pytest.mark.slow
def test_registered_model_loads_in_a_fresh_process_without_project_data(project, model_name, tmp_path):
    """Log + register + alias, delete the project, then load models:/name@champion elsewhere."""
    import mlflow

    from genre_tasks.registry import serving
    from genre_tasks.registry import tracking, tracking_store

    ds = D.Dataset.load(project)
    fit, _ = ds.phase("test")
    with tracking.pipeline_run(project, {"test": 1}):
        info = serving.log_model(project.model_dir / "content", fit, ds.items[S.TITLE].tolist(), tmp_path)
    mv = mlflow.register_model(info.model_uri, model_name)
    client = tracking_store.client(project)
    client.set_registered_model_alias(model_name, "champion", mv.version)
    hist = [str(fit.item_ids[i]) for i in fit.histories[0][:4]]
    shutil.rmtree(project.root)  # the model must not need the project's data

    script = textwrap.dedent(f"""
        import json, sys
        import mlflow, pandas as pd
        assert "genre_tasks" not in sys.modules
        m = mlflow.pyfunc.load_model("models:/{model_name}@champion")
        out = m.predict(pd.DataFrame({{"history": [{hist!r}], "k": [5]}}))
        py = m.unwrap_python_model()
        print(json.dumps({{"ids": list(out["item_ids"][0]), "scores": list(out["scores"][0]),
                          "recommender": py.recommender.name,
                          "inputs": [c["name"] for c in m.metadata.get_input_schema().to_dict()]}}))
    """)
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": tracking_store.tracking_uri(project)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(res["ids"]) == 5 and not set(res["ids"]) & set(hist)
    assert res["scores"] == sorted(res["scores"], reverse=True)
    assert res["recommender"] == "genre_content"
    assert res["inputs"] == ["history", "k", "timestamps"]
    # what `mlflow models serve` installs: explicit pins, no inference, torch without +cpu
    local = mlflow.artifacts.download_artifacts(f"models:/{model_name}/{mv.version}", dst_path=str(tmp_path / "dl"))
    reqs = (tmp_path / "dl" / "requirements.txt").read_text() if local else ""
    assert "torch==2.13.0\n" in reqs and "mlflow==" in reqs


@pytest.mark.slow
def test_recommend_for_a_known_user_with_reasons_and_a_clear_error_otherwise(project, model_name, capsys):
    from genre_tasks.registry import recommend as R

    params = {"promote": {"model_name": model_name}}
    assert R.main(params, project, "u0", 5) == 1  # no champion yet: a clear error, no traceback
    assert "no model version" in capsys.readouterr().err
    assert promote(project, model_name)["decision"] == "promoted"

    df = R.recommend("u0", 5, project, model_name)
    assert list(df.columns) == ["rank", "item_id", "title", "score", "reason", "reason_generated"]
    assert len(df) == 5 and not df["reason_generated"].any()  # no LLM asked: every reason is the model's own
    assert not set(df["item_id"]) & set(df.attrs["history"]) and df.attrs["history"]
    assert df["title"].str.contains("movie").all() and df["reason"].str.startswith("like '").all()
    assert R.main(params, project, "u0", 3) == 0
    out = capsys.readouterr().out
    assert "top-3 for user u0" in out and "  1. " in out
    with pytest.raises(R.UnknownUserError, match="unknown user 'nobody'"):
        R.recommend("nobody", 5, project, model_name)
    assert R.main(params, project, "nobody", 5) == 1
    assert "unknown user 'nobody'" in capsys.readouterr().err
