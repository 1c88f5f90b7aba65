"""DAG integrity: every DAG in dags/ imports, is documented and owned, parses cheaply.

DAG files are parsed in fresh subprocesses (own AIRFLOW_HOME in tmp, no DB), so that importing
Airflow never touches this test process and ``sys.modules`` shows exactly what parsing loaded:

* no import errors; every DAG has tags, doc_md, an owner and a retries default;
* parsing leaves torch, transformers, mlflow, great_expectations, sklearn and pandas unloaded;
* parsing runs no SQL and looks up no Variable/Connection (they are patched to raise);
* the trigger-form params: defaults validate, bad values are refused, and every value the form
  offers is accepted by the genre_tasks params dataclasses.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
sys.path.insert(0, str(DAGS))
import _common  # noqa: E402  (stdlib + genre_tasks.config/schema only)

HEAVY = ("torch", "transformers", "mlflow", "great_expectations", "sklearn", "pandas")

PARSE_SCRIPT = textwrap.dedent(r'''
    import json, sys
    mode, dags_folder = sys.argv[1], sys.argv[2]
    lookups = []
    if mode == "patched":
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        def no_sql(conn, cursor, statement, *args, **kwargs):
            lookups.append("SQL: " + statement[:200])
            raise RuntimeError("SQL query while parsing DAG files: " + statement[:200])

        event.listen(Engine, "before_cursor_execute", no_sql)

        def forbid(what):
            def raiser(*args, **kwargs):
                lookups.append(what)
                raise RuntimeError(what + " called while parsing DAG files")
            return raiser

        import airflow.sdk
        from airflow.sdk.bases.hook import BaseHook
        airflow.sdk.Variable.get = staticmethod(forbid("Variable.get"))
        airflow.sdk.Connection.get = classmethod(forbid("Connection.get"))
        BaseHook.get_connection = classmethod(forbid("BaseHook.get_connection"))
        from airflow.models.connection import Connection as ModelConnection
        from airflow.models.variable import Variable as ModelVariable
        ModelVariable.get = staticmethod(forbid("models.Variable.get"))
        ModelConnection.get_connection_from_secrets = classmethod(
            forbid("Connection.get_connection_from_secrets"))

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=dags_folder)
    report = {"import_errors": {str(k): v for k, v in bag.import_errors.items()},
              "lookups": lookups, "dags": {},
              "heavy": sorted(m for m in sys.argv[3].split(",") if m in sys.modules)}
    for dag_id, dag in bag.dags.items():
        params = {}
        for name in dag.params:
            param = dag.params.get_param(name)
            params[name] = {"schema": param.schema, "description": param.description,
                            "default": param.value if param.has_value else "<none>"}
        report["dags"][dag_id] = {
            "fileloc": dag.fileloc, "tags": sorted(dag.tags), "doc_md": dag.doc_md or "",
            "owner": dag.default_args.get("owner"), "retries": dag.default_args.get("retries"),
            "max_active_runs": dag.max_active_runs, "catchup": dag.catchup,
            "timetable": type(dag.timetable).__name__, "params": params,
            "params_valid": None,
            "tasks": {t.task_id: {"retries": t.retries, "backoff": t.retry_exponential_backoff,
                                  "upstream": sorted(t.upstream_task_ids),
                                  "trigger_rule": str(t.trigger_rule), "owner": t.owner,
                                  "is_setup": t.is_setup, "is_teardown": t.is_teardown,
                                  "outlets": [getattr(o, "uri", str(o)) for o in t.outlets],
                                  "multiple_outputs": getattr(t, "multiple_outputs", None),
                                  "mapped": "Mapped" in type(t).__name__}
                      for t in dag.tasks},
        }
        try:
            dag.params.validate()
            report["dags"][dag_id]["params_valid"] = True
        except Exception as exc:
            report["dags"][dag_id]["params_valid"] = repr(exc)
    if dags_folder.endswith("dags") and "genre_training" in bag.dags:
        dag = bag.dags["genre_training"]
        checks = {}
        for name, value in [("adapter", "csv"), ("epochs", 0), ("epochs", 1000), ("strategies", ["deep"]),
                            ("max_users", 0), ("dry_run", "yes"), ("split_mode", "random")]:
            try:
                dag.params.get_param(name).resolve(value)
                checks[f"{name}={value!r}"] = "accepted"
            except Exception:
                checks[f"{name}={value!r}"] = "refused"
        for name, value in [("adapter", "tabular"), ("epochs", 2), ("strategies", ["content"]),
                            ("max_users", 40), ("split_mode", "cold_items"), ("adapter", None)]:
            try:
                dag.params.get_param(name).resolve(value)
                checks[f"ok {name}={value!r}"] = "accepted"
            except Exception as exc:
                checks[f"ok {name}={value!r}"] = "refused: " + repr(exc)
        report["param_checks"] = checks
    print("REPORT " + json.dumps(report, default=str))
''')


def parse_dags(tmp_path: Path, mode: str, folder: Path = DAGS) -> dict:
    """Parse ``folder`` in a fresh interpreter (own AIRFLOW_HOME, no DB); return its report."""
    home = tmp_path / f"airflow_home_{mode}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AIRFLOW") or k.startswith("AIRFLOW_CONN_")}  # connections: kept
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(folder),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "GENRE_PROJECT_ROOT": str(ROOT),
        "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    })
    proc = subprocess.run([sys.executable, "-c", PARSE_SCRIPT, mode, str(folder), ",".join(HEAVY)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, f"parse failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("REPORT "):])


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return parse_dags(tmp_path_factory.mktemp("dagparse"), "plain")


def test_dags_import_without_errors(report):
    assert report["import_errors"] == {}
    assert "genre_training" in report["dags"]
    dag_files = {Path(d["fileloc"]).name for d in report["dags"].values()}
    expected = {p.name for p in DAGS.glob("*.py") if not p.name.startswith("_")}
    assert expected <= dag_files, f"DAG files without a DAG: {expected - dag_files}"


def test_every_dag_is_documented_owned_and_retried(report):
    for dag_id, dag in report["dags"].items():
        assert dag["tags"], f"{dag_id}: no tags"
        assert len(dag["doc_md"].strip()) > 100, f"{dag_id}: no doc_md"
        assert dag["owner"] and dag["owner"] != "airflow", f"{dag_id}: no owner in default_args"
        assert dag["retries"] is not None, f"{dag_id}: no retries in default_args"
        assert dag["params_valid"] is True, f"{dag_id}: param defaults invalid: {dag['params_valid']}"
        for name, p in dag["params"].items():
            assert p["description"], f"{dag_id}: param {name} has no description"
            assert p["schema"].get("type"), f"{dag_id}: param {name} is untyped"


def test_parsing_imports_nothing_heavy(report):
    assert report["heavy"] == [], f"parsing dags/ imported {report['heavy']}"


def test_parsing_makes_no_db_queries_or_connection_lookups(tmp_path, monkeypatch):
    # the connections are defined (as a deployment would), so a parse-time read would find them;
    # the patched look-ups record and refuse any read (the tasks read them, via stage_environment)
    monkeypatch.setenv("AIRFLOW_CONN_GENRE_MLFLOW", '{"conn_type": "http", "host": "mlflow.example"}')
    monkeypatch.setenv("AIRFLOW_CONN_GENRE_DVC_REMOTE", '{"conn_type": "generic", "host": "/tmp/r"}')
    patched = parse_dags(tmp_path, "patched")
    assert patched["lookups"] == []
    assert patched["import_errors"] == {}
    assert set(patched["dags"]) >= {"genre_training"}


def test_guards_catch_a_bad_dag_file(tmp_path):
    """The two checks above do fail on a DAG file that looks up a Variable / imports pandas."""
    folder = tmp_path / "bad_dags"
    folder.mkdir()
    (folder / "bad_dag.py").write_text(textwrap.dedent("""
        import pandas  # heavy import at parse time
        from airflow.sdk import Variable, dag, task

        THRESHOLD = Variable.get("threshold", default=1)  # lookup at parse time

        @dag(schedule=None, tags=["bad"])
        def bad_dag():
            task(lambda: None, task_id="noop")()

        bad_dag()
    """))
    # a connection read at parse time (the MLflow server's, as the tasks read it) is caught too
    (folder / "bad_conn_dag.py").write_text(textwrap.dedent("""
        from airflow.sdk import Connection, dag, task

        TRACKING = Connection.get("genre_mlflow").host  # lookup at parse time

        @dag(schedule=None, tags=["bad"])
        def bad_conn_dag():
            task(lambda: None, task_id="noop")()

        bad_conn_dag()
    """))
    bad = parse_dags(tmp_path, "patched", folder)
    assert "Variable.get" in bad["lookups"] and "Connection.get" in bad["lookups"]
    assert len(bad["import_errors"]) == 2
    assert "pandas" in bad["heavy"]


def test_training_dag_shape(report):
    dag = report["dags"]["genre_training"]
    tasks = dag["tasks"]
    stages = ["ingest", "validate", "preprocess", "augment", "embed", "genre", "train", "evaluate", "promote"]
    shards = ["embed_plan", "embed_shard"]  # the embed scale-out (embed.shards)
    assert set(tasks) == {"start_mlflow_run", "snapshot_params", *stages, *shards, "finish_mlflow_run"}
    chain = ["start_mlflow_run", "snapshot_params", *stages[:4], "embed_shard", *stages[4:], "finish_mlflow_run"]
    for before, after in zip(chain[:-1], chain[1:]):
        assert before in tasks[after]["upstream"], f"{before} >> {after} missing"
    # the shard plan reads only the params snapshot: it runs beside the data stages
    assert set(tasks["embed_plan"]["upstream"]) == {"start_mlflow_run", "snapshot_params"}
    assert "embed_plan" in tasks["embed_shard"]["upstream"]
    for stage in stages + shards:  # every stage gets the MLflow run id
        assert "start_mlflow_run" in tasks[stage]["upstream"]
        assert tasks[stage]["trigger_rule"].endswith("ALL_SUCCESS"), (stage, tasks[stage]["trigger_rule"])
        assert tasks[stage]["multiple_outputs"] is False  # one small XCom per task
    assert tasks["embed_shard"]["mapped"] and not tasks["embed"]["mapped"]
    assert "embed_plan" in tasks["embed_shard"]["upstream"]  # expands over the plan's ids
    assert tasks["embed_shard"]["retries"] >= 1  # idempotent: a killed shard is retried
    assert tasks["start_mlflow_run"]["is_setup"] and tasks["finish_mlflow_run"]["is_teardown"]
    for name in ("validate", "preprocess", "genre"):
        assert tasks[name]["retries"] == 0, name
    for name in ("embed", "train", "evaluate", "promote"):
        assert tasks[name]["retries"] >= 1 and tasks[name]["backoff"] > 1, name
    assert tasks["promote"]["outlets"] == ["genre://models/genre-recommender"]
    assert dag["max_active_runs"] == 2 and dag["catchup"] is False  # a workspace per run
    assert dag["timetable"] == "AssetOrTimeSchedule"


def test_training_params_refuse_bad_values(report):
    checks = report["param_checks"]
    refused = {k: v for k, v in checks.items() if not k.startswith("ok ")}
    assert all(v == "refused" for v in refused.values()), refused
    accepted = {k: v for k, v in checks.items() if k.startswith("ok ")}
    assert all(v == "accepted" for v in accepted.values()), accepted


# --- the trigger form vs genre_tasks (no Airflow needed) -------------------------------------
def test_form_choices_match_genre_tasks():
    from genre_tasks import schema
    from genre_tasks.data import adapters
    from genre_tasks.models import train

    assert set(_common.ADAPTERS) == set(adapters.ADAPTERS)
    assert tuple(_common.SPLIT_MODES) == tuple(schema.SPLIT_MODES)
    assert tuple(_common.STRATEGIES) == tuple(train.STRATEGIES)


@pytest.mark.parametrize("form", [
    {},
    {"adapter": None, "max_users": None, "split_mode": None, "strategies": None, "epochs": None,
     "dry_run": False, "force_promote": False, "overrides": {}},
    {"adapter": "mind", "max_users": 40, "split_mode": "cold_items", "strategies": ["content"],
     "epochs": 2, "force_promote": True, "overrides": {"train": {"dim": 32}}},
])
def test_form_values_make_valid_params(form):
    from genre_tasks import config
    from genre_tasks.data.adapters.params import IngestParams
    from genre_tasks.data.preprocess import PreprocessParams
    from genre_tasks.registry.gate import PromoteParams
    from genre_tasks.models.params import TrainParams

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = config.deep_merge(base, _common.overrides_from_params(form))
    ingest = config.section(IngestParams, "ingest", params)
    pre = config.section(PreprocessParams, "preprocess", params)
    tr = config.section(TrainParams, "train", params)
    promote = config.section(PromoteParams, "promote", params)
    if not form or form.get("adapter") is None:  # empty form = params.yaml untouched
        assert params == base
    else:
        assert (ingest.adapter, ingest.max_users, pre.split.mode) == ("mind", 40, "cold_items")
        assert (tr.strategies, tr.epochs, tr.dim, promote.force) == (("content",), 2, 32, True)


def test_typed_fields_win_over_free_overrides():
    ov = _common.overrides_from_params({"epochs": 3, "overrides": {"train": {"epochs": 9, "dim": 8}}})
    assert ov == {"train": {"epochs": 3, "dim": 8}}


@pytest.mark.parametrize("run_type, overrides, retrain, expected", [
    ("asset_triggered", {}, "warm", "warm"),       # new feedback: a feedback retrain
    ("asset_triggered", {}, "full", "full"),       # ... as train.retrain_mode says
    ("asset_triggered", {"train": {"mode": "full"}}, "warm", "full"),  # the Variable wins
    ("scheduled", {}, "warm", "full"),             # the weekly run: train.mode of params.yaml
    ("manual", {}, "warm", "full"),
])
def test_asset_triggered_runs_are_feedback_retrains(run_type, overrides, retrain, expected):
    from genre_tasks import config
    from genre_tasks.models.params import TrainParams

    base = config.deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                             {"train": {"retrain_mode": retrain}})
    params = config.deep_merge(base, overrides)
    params = config.deep_merge(params, _common.retrain_overrides(run_type, overrides, params))
    assert config.section(TrainParams, "train", params).mode == expected
    assert base["train"]["mode"] == "full"  # params.yaml: scheduled/manual runs train in full


def test_small_summary_drops_big_fields():
    summary = {"success": True, "rows": 3, "tables": {"items": ["x" * 100] * 50}, "path": Path("/a")}
    small = _common.small_summary(summary)
    assert small["success"] is True and small["rows"] == 3 and small["path"] == "/a"
    assert "tables" not in small and small["_dropped"] == ["tables"]
    assert len(json.dumps(small)) <= _common.XCOM_TOTAL_MAX
    many = {f"k{i}": "v" * 400 for i in range(50)}
    assert len(json.dumps(_common.small_summary(many))) <= _common.XCOM_TOTAL_MAX


def test_project_root_and_schedule_from_env(monkeypatch, tmp_path):
    monkeypatch.delenv(_common.ROOT_ENV, raising=False)
    assert _common.project_root() == ROOT
    monkeypatch.setenv(_common.ROOT_ENV, str(tmp_path))
    assert _common.project_root() == tmp_path.resolve()
    monkeypatch.delenv(_common.SCHEDULE_ENV, raising=False)
    assert _common.schedule_expression() == "@weekly"
    monkeypatch.setenv(_common.SCHEDULE_ENV, "0 3 * * 1")
    assert _common.schedule_expression() == "0 3 * * 1"
    monkeypatch.setenv(_common.SCHEDULE_ENV, "none")
    assert _common.schedule_expression() is None


# --- run-size knobs from an Airflow Variable (read inside snapshot_params, never at parse time)
@pytest.mark.parametrize("stored, expected", [
    (None, {}), ("", {}), ('{"ingest": {"max_users": 60}}', {"ingest": {"max_users": 60}}),
])
def test_variable_overrides_reads_a_json_object(monkeypatch, stored, expected):
    from airflow.sdk import Variable

    monkeypatch.setattr(Variable, "get", staticmethod(lambda key, default=None, **kw: stored))
    assert _common.variable_overrides() == expected


@pytest.mark.parametrize("stored, message", [("[1, 2]", "must be a JSON object"), ("{nope", "not JSON")])
def test_variable_overrides_refuses_bad_values(monkeypatch, stored, message):
    from airflow.sdk import Variable
    from genre_tasks.config import ParamsError

    monkeypatch.setattr(Variable, "get", staticmethod(lambda key, default=None, **kw: stored))
    with pytest.raises(ParamsError, match=message):
        _common.variable_overrides()


def test_landing_folder_follows_params_yaml(tmp_path):
    (tmp_path / "params.yaml").write_text("feedback:\n  incoming: drops/in\n")
    assert _common.landing_folder(tmp_path) == tmp_path / "drops" / "in"
    (tmp_path / "params.yaml").write_text("ingest: {}\n")
    assert _common.landing_folder(tmp_path) == tmp_path / "data" / "feedback" / "incoming"


@pytest.mark.parametrize("form, refused", [
    ({"force_promote": True}, True), ({"force_promote": True, "force_reason": "   "}, True),
    ({"force_promote": True, "force_reason": None}, True),
    ({"force_promote": True, "force_reason": "rollback drill"}, False),
    ({"force_promote": False}, False), ({"force_reason": "no force: ignored"}, False)])
def test_a_forced_promotion_needs_a_reason(form, refused):
    from genre_tasks.config import ParamsError

    if refused:
        with pytest.raises(ParamsError, match="force_promote needs force_reason"):
            _common.check_force_reason(form)
    else:
        _common.check_force_reason(form)
