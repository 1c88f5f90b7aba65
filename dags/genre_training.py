"""
### genre_training: (re)train, evaluate and promote the GENRE recommender

The same pipeline as `dvc repro` (see `dvc.yaml`), one Airflow task per stage, and every stage
runs **through DVC** in this DAG run's own workspace `runs/<run id>/` (`genre_tasks.registry.workspace`):
`dvc repro --single-item --pull <stage>` (an unchanged stage is restored from the DVC run-cache:
nothing computed), then `dvc push <stage> --run-cache`. The workspace's `params.yaml` is this
run's params snapshot: `<root>/params.yaml` + `$GENRE_PARAMS_OVERRIDE` files + the trigger form,
written once by `snapshot_params`. The run's `dvc.lock` and snapshot live in its MLflow run, so a
task can start on a worker with an empty workspace. `root` is `$GENRE_PROJECT_ROOT` (default: the
folder above `dags/`). XComs carry only small stage summaries (how the stage ran, its headline
numbers); the data travels through the DVC cache/remote.

| task | what it does | retries |
|---|---|---|
| `start_mlflow_run` | setup: finds (by tags `airflow.dag_id` + `airflow.run_id`) or creates the MLflow run of this DAG run, tags it with a link to this run's grid, returns its id | yes |
| `snapshot_params` | the run's effective params -> the workspace's `params.yaml`, MLflow params + artifact `run/params.yaml`, XCom (hash, overrides, workspace); bad params fail here | yes |
| `ingest` | `source` (copy/check the raw files in `data/source`) then `ingest` (-> `data/raw`) | yes |
| `validate` | Great Expectations suites on `data/raw`; a broken rule fails the run, the GX summary is in the task log, nothing downstream runs | no |
| `preprocess` | clean, label positives, split (`split_mode`) -> `data/processed` | no (deterministic) |
| `augment` | GENRE generative augmentation (`data/augment`: enriched items, user profiles, cold-user synthetic items; validated, cached by model/template/input); a no-op writing empty outputs unless `augment.enabled` (e.g. `configs/genre.yaml`) | yes, backoff |
| `embed_plan` | the shards of `embed.shards` from the run's params snapshot (`[{"shard": i, "of": N}]`) | yes |
| `embed_shard` | mapped, one per shard: its own workspace, `dvc pull` of the items, encodes a disjoint slice of the distinct texts, uploads the part to the MLflow run (`genre_tasks.registry.shards`); with `embed.shards: 1` one instance that returns at once | yes, backoff (idempotent) |
| `embed` | the parts (if any) into the embedding cache, then item texts (+ the enriched text when `embed.augmented_text`) -> MiniLM vectors (`data/embeddings`, cached) | yes, backoff |
| `genre` | genre classifier on the item vectors -> `data/genre` | no (deterministic) |
| `train` | one model per strategy, best on validation nDCG@10 -> `data/model` | yes, backoff |
| `evaluate` | test metrics vs baselines -> `data/eval`, `metrics/evaluate.json` | yes, backoff |
| `promote` | register the challenger in the MLflow registry, move `@champion` only if it is measurably better (`force_promote` overrides); skipped when `dry_run`; emits the asset `genre://models/genre-recommender` | yes, backoff |
| `finish_mlflow_run` | teardown (runs even after a failure): marks the MLflow run FINISHED/FAILED; a successful run is published into the project folder (its dvc.lock + outputs) | yes |

Every stage task exports `GENRE_MLFLOW_RUN_ID` (the id `start_mlflow_run` returned), so the
promote stage logs into this DAG run's MLflow run. A stage that refuses its input (`StageError`,
e.g. a failed validation) fails at once, without retries; anything else (a killed worker, a
locked database) is retried with exponential backoff where retrying can help.

**Schedule**: `$GENRE_TRAINING_SCHEDULE` (cron or preset, default `@weekly`; `none` = no timer)
**or** an update of the asset `genre://interactions/store` (new feedback), whichever comes first.

**Trigger form**: empty values keep what `params.yaml` says; `max_users` slices the data for a
quick run; `overrides` takes any other `params.yaml` values (deep-merged).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from airflow.sdk import (
    Asset,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    chain,
    dag,
    get_current_context,
    setup,
    task,
    teardown,
)
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

# The dag-processor puts the bundle folder (dags/) on sys.path; a plain DagBag or pytest does not.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    PARAMS_VARIABLE,
    ACTOR_ENV,
    REASON_ENV,
    REGISTRY_POOL,
    RUN_ID_ENV,
    ADAPTERS,
    SPLIT_MODES,
    STRATEGIES,
    check_force_reason,
    overrides_from_params,
    project_root,
    schedule_expression,
    small_summary,
    stage_environment,
    store_queue,
    variable_overrides,
    retrain_overrides,
)

log = logging.getLogger(__name__)

DAG_ID = "genre_training"
#: updated by the feedback DAG when new interactions land: triggers a retraining
INTERACTIONS = Asset("genre://interactions/store")
#: updated by promote: a new model version is in the registry (maybe the new @champion)
MODEL = Asset("genre://models/genre-recommender")
#: MLflow tag of the pipeline run: where it tracked and stored data (connection or env, masked)
CONNECTIONS_TAG = "genre.connections"

#: tasks where retrying can help (a killed worker, a locked database, a flaky file system)
RETRY = {"retries": 2, "retry_delay": timedelta(minutes=1), "retry_exponential_backoff": 2.0,
         "max_retry_delay": timedelta(minutes=15)}
#: deterministic tasks, and validation: a failure would fail again
NO_RETRY = {"retries": 0}

DEFAULT_ARGS = {
    "owner": "genre-mlops",
    "retries": 1,
    "retry_delay": timedelta(minutes=1),
    "execution_timeout": timedelta(hours=3),
}


def _schedule():
    expression = schedule_expression()
    if expression is None:
        return INTERACTIONS
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(expression, timezone="UTC"),
                               assets=INTERACTIONS)


PARAMS = {
    "adapter": Param(
        None, type=["null", "string"], enum=[None, *ADAPTERS], title="Data adapter",
        values_display={None: "as in params.yaml", **{a: a for a in ADAPTERS}},
        description="Input format (ingest.adapter). mind/tabular read your files in data/source.",
        section="Data"),
    "max_users": Param(
        None, type=["null", "integer"], minimum=1, title="Max users",
        description="Keep only the N users with the smallest ids (ingest.max_users), for quick "
                    "runs. Empty = as in params.yaml (all users).",
        section="Data"),
    "split_mode": Param(
        None, type=["null", "string"], enum=[None, *SPLIT_MODES], title="Split mode",
        values_display={None: "as in params.yaml", **{m: m for m in SPLIT_MODES}},
        description="How interactions are split into train/valid/test (preprocess.split.mode).",
        section="Data"),
    "strategies": Param(
        None, type=["null", "array"], items={"type": "string", "enum": list(STRATEGIES)},
        examples=list(STRATEGIES), uniqueItems=True, minItems=1, title="Strategies",
        description="Models to train (train.strategies); the best on validation nDCG@10 is "
                    "the challenger. Empty = as in params.yaml.",
        section="Training"),
    "epochs": Param(
        None, type=["null", "integer"], minimum=1, maximum=200, title="Epochs",
        description="Maximum training epochs (train.epochs, early stopping still applies). "
                    "Empty = as in params.yaml.",
        section="Training"),
    "train_mode": Param(
        None, type=["null", "string"], enum=[None, "full", "warm"], title="Training mode",
        values_display={None: "as in params.yaml", "full": "full (every strategy from scratch)",
                        "warm": "warm (the champion's strategy from its weights, few epochs)"},
        description="train.mode: warm = a feedback retrain starting from train.warm_from "
                    "(default the @champion); full = everything from scratch (the weekly run).",
        section="Training"),
    "dry_run": Param(
        False, type="boolean", title="Dry run",
        description="Stop before promote: train and evaluate, register nothing (promote is skipped).",
        section="Promotion"),
    "force_promote": Param(
        False, type="boolean", title="Force promotion",
        description="Make the challenger @champion even if it is not measurably better than "
                    "the champion (recorded as decision=forced with the triggering user and the "
                    "reason below). Never promotes a model significantly worse than the best "
                    "baseline of the run.",
        section="Promotion"),
    "force_reason": Param(
        None, type=["null", "string"], title="Reason for forcing",
        description="Required with 'Force promotion': recorded on the model version.",
        section="Promotion"),
    "overrides": Param(
        {}, type="object", title="Other params.yaml overrides",
        description='Any params.yaml values, deep-merged (the fields above win), e.g. '
                    '{"train": {"dim": 32}, "promote": {"bootstrap_samples": 200}}.',
        section="Advanced"),
}


def _run_stages(stages: tuple[str, ...], mlflow_run_id: str | None, extra_env: dict | None = None,
                prepare=None) -> dict:
    """Run ``stages`` through DVC in this DAG run's workspace; return their small summaries.

    ``genre_tasks.registry.workspace``: the workspace is rebuilt from the run's MLflow record if this
    worker has not got it, each stage is ``dvc repro --single-item --pull <stage>`` (skipped or
    restored from the DVC run-cache when nothing changed) then ``dvc push``; after each stage
    the run's dvc.lock goes to MLflow and the stage's numbers/artifacts are logged live.
    """
    from genre_tasks.registry import stage_logging, tracking
    from genre_tasks.registry import workspace as W
    from genre_tasks.schema import Paths

    context = get_current_context()
    root = project_root()
    ws = W.workspace(root, context["ti"].run_id)
    summaries: dict = {}
    env = {RUN_ID_ENV: mlflow_run_id, **(extra_env or {})} if mlflow_run_id else dict(extra_env or {})
    with stage_environment(root, mlflow_run_id, lambda: W.tracking_env(root)):
        paths = Paths(root)
        W.materialise(ws, mlflow_run_id, paths)
        log.info("workspace %s (DVC cache %s)", ws.path, ws.cache_dir)
        prepared = prepare(ws, paths) if prepare else None
        for stage in stages:
            # shared: parallel stages of this run go on; the workspace is not re-made (nor its
            # dvc.lock replaced by MLflow's older copy) until this stage's lock is uploaded
            with W.guard(ws, exclusive=False):
                try:
                    result = W.run_stage(ws, stage, env=env)
                except W.StageFailed as exc:
                    if mlflow_run_id:
                        tracking.set_tags(mlflow_run_id, {f"{stage_logging.STAGE_TAG}{stage}": "failed"}, paths)
                    if exc.refused:
                        # Bad params or a stage refusing its input: retrying cannot help, fail
                        # at once. The stage's own message (validate: the GX summary) is logged.
                        log.error("stage %s FAILED (exit %s): the stage refused its input or params",
                                  stage, exc.code)
                        raise AirflowFailException(f"{stage}: exit {exc.code}") from exc
                    raise
                finally:
                    if mlflow_run_id:
                        tracking.log_run_lock(mlflow_run_id, ws.lock_file, paths)
            if mlflow_run_id:
                stage_logging.log_stage(mlflow_run_id, stage, Paths(ws.path), result["how"], result["seconds"])
            metrics = ws.path / "metrics" / f"{stage}.json"
            if metrics.exists():
                result["metrics"] = small_summary(json.loads(metrics.read_text()), value_max=256,
                                                  total_max=1536)
            if prepared:
                result["prepared"] = prepared
            summaries[stage] = result
            log.info("stage %s: %s in %.1f s", stage, result["how"], result["seconds"])
    return summaries


# --- tasks ------------------------------------------------------------------------------------
@setup
@task(multiple_outputs=False, **RETRY)
def start_mlflow_run() -> str:
    """Find (retried/cleared DAG run) or create the MLflow run of this DAG run; return its id."""
    from genre_tasks.registry import tracking, tracking_store
    from genre_tasks.schema import Paths

    context = get_current_context()
    ti = context["ti"]
    dag_id, run_id = ti.dag_id, ti.run_id
    grid_url = ti.log_url.split("/tasks/")[0]
    root = project_root()
    paths = Paths(root)
    run_type = context["dag_run"].run_type
    with stage_environment(root, None):
        mlflow_run_id, created = tracking.start_pipeline_run(
            paths, dag_id, run_id, grid_url, str(getattr(run_type, "value", run_type)))
        log.info("%s MLflow run %s for DAG run %s (tracking URI %s, Airflow grid %s)",
                 "created" if created else "reusing", mlflow_run_id, run_id,
                 tracking_store.tracking_uri(paths), grid_url)
    return mlflow_run_id


@task(multiple_outputs=False, **RETRY, **store_queue())
def snapshot_params(mlflow_run_id: str) -> dict:
    """The effective params of this DAG run (params.yaml + $GENRE_PARAMS_OVERRIDE + trigger
    form), written ONCE as the params.yaml of the run's workspace (what DVC reads), logged to
    the MLflow run (params + artifact run/params.yaml + tag genre.params_hash); XCom shows the
    hash, the overrides and the workspace. A retry/clear reuses the snapshot already made."""
    from genre_tasks.registry import tracking, tracking_store
    from genre_tasks import config
    from genre_tasks.registry import workspace as W
    from genre_tasks.config import ParamsError
    from genre_airflow import connections
    from genre_tasks.schema import Paths

    context = get_current_context()
    root = project_root()
    ws = W.workspace(root, context["ti"].run_id)
    with stage_environment(root, mlflow_run_id, lambda: W.tracking_env(root)) as resolved:
        paths = Paths(root)
        # where this run tracks and stores data: the Airflow connections genre_mlflow /
        # genre_dvc_remote when defined, else the environment (secrets masked)
        where = resolved.effective
        where["mlflow"].setdefault("MLFLOW_TRACKING_URI", connections.masked(
            {"uri": tracking_store.tracking_uri(paths)})["uri"])
        log.info("MLflow from %s, DVC remote from %s: %s", where["mlflow"]["source"],
                 where["dvc_remote"]["source"], where)
        try:
            # run-size knobs an operator edits in the UI (Admin > Variables), read here at run
            # time, never at parse time; the trigger form wins over them
            knobs = variable_overrides()
            overrides = config.deep_merge(knobs, overrides_from_params(context["params"]))
            check_force_reason(context["params"])
            params = W.effective_params(root, overrides)
            retrain = retrain_overrides(context["dag_run"].run_type, overrides, params)
            if retrain:  # started by new feedback: a feedback retrain (train.retrain_mode)
                log.info("asset-triggered run: train.mode %s (train.retrain_mode)", retrain["train"]["mode"])
                overrides = config.deep_merge(overrides, retrain)
                params = W.effective_params(root, overrides)
            W.check_params(params)
        except ParamsError as exc:
            log.error("bad params: %s", exc)
            raise AirflowFailException(f"bad params: {exc}") from exc
        W.create(ws, params)
        logged = tracking.log_params_snapshot(mlflow_run_id, params, ws.params_file, paths)
        if ws.lock_file.exists():  # seeded from the project's feedback store: the record travels
            tracking.log_run_lock(mlflow_run_id, ws.lock_file, paths)
        tracking.log_artifact(mlflow_run_id, ws.path / "dvc.yaml", paths, "run")  # the pipeline as run
        tracking.set_tags(mlflow_run_id, {W.WORKSPACE_TAG: str(ws.path),
                                          CONNECTIONS_TAG: json.dumps(where, sort_keys=True)}, paths)
    out = {"params_hash": logged["params_hash"], "overrides": overrides,
           "variable": {PARAMS_VARIABLE: knobs} if knobs else {},
           "override_files": os.environ.get("GENRE_PARAMS_OVERRIDE", ""), "workspace": str(ws.path),
           "connections": where,
           "mlflow_artifact": W.PARAMS_ARTIFACT}
    log.info("params snapshot %s", out)
    return small_summary(out)


@task(multiple_outputs=False)
def ingest(mlflow_run_id: str) -> dict:
    """source (copy/check data/source) then ingest (-> data/raw)."""
    return _run_stages(("source", "ingest"), mlflow_run_id)


@task(multiple_outputs=False, **NO_RETRY)
def validate(mlflow_run_id: str) -> dict:
    """Great Expectations on data/raw; a broken rule fails the run (GX summary in the log)."""
    return _run_stages(("validate",), mlflow_run_id)["validate"]


@task(multiple_outputs=False, **NO_RETRY)
def preprocess(mlflow_run_id: str) -> dict:
    return _run_stages(("preprocess",), mlflow_run_id)["preprocess"]


@task(multiple_outputs=False, **RETRY)
def augment(mlflow_run_id: str) -> dict:
    """LLM augmentation (genre_tasks.features.augment.stage); cheap no-op when disabled."""
    return _run_stages(("augment",), mlflow_run_id)["augment"]


@task(multiple_outputs=False, **RETRY)
def embed_plan(mlflow_run_id: str) -> list[dict]:
    """What embed_shard maps over: [{"shard": i, "of": N}] for embed.shards = N."""
    from genre_tasks.registry import shards
    from genre_tasks.registry import workspace as W
    from genre_tasks.schema import Paths

    context = get_current_context()
    root = project_root()
    ws = W.workspace(root, context["ti"].run_id)
    with stage_environment(root, mlflow_run_id, lambda: W.tracking_env(root)):
        W.materialise(ws, mlflow_run_id, Paths(root))
        return shards.plan(ws)


# one mapped instance per shard; idempotent (a retry rewrites its own part), so it retries
@task(multiple_outputs=False, **RETRY)
def embed_shard(mlflow_run_id: str, shard: dict) -> dict:
    """Encode one disjoint slice of the item texts in a workspace of its own; the part goes to
    the MLflow run (``genre_tasks.registry.shards``). With one shard: returns at once."""
    if shard["of"] <= 1:
        log.info("embed.shards is 1: nothing to do here, the embed task encodes every text")
        return {"shard": 0, "of": 1, "skipped": True}
    from genre_tasks.registry import shards
    from genre_tasks.registry import workspace as W
    from genre_tasks.schema import Paths

    context = get_current_context()
    root = project_root()
    ws = W.workspace(root, context["ti"].run_id)
    with stage_environment(root, mlflow_run_id, lambda: W.tracking_env(root)):
        out = shards.run_embed_shard(ws, mlflow_run_id, int(shard["shard"]), Paths(root))
    log.info("embed shard %s", out)
    return small_summary(out)


@task(multiple_outputs=False, **RETRY)
def embed(mlflow_run_id: str) -> dict:
    """The embed DVC stage; with shards, their parts fill the embedding cache first."""
    from genre_tasks.registry import shards

    return _run_stages(("embed",), mlflow_run_id,
                       prepare=lambda ws, paths: shards.collect(ws, mlflow_run_id, paths))["embed"]


@task(multiple_outputs=False, **NO_RETRY)
def genre(mlflow_run_id: str) -> dict:
    return _run_stages(("genre",), mlflow_run_id)["genre"]


@task(multiple_outputs=False, **RETRY)
def train(mlflow_run_id: str) -> dict:
    return _run_stages(("train",), mlflow_run_id)["train"]


@task(multiple_outputs=False, **RETRY)
def evaluate(mlflow_run_id: str) -> dict:
    return _run_stages(("evaluate",), mlflow_run_id)["evaluate"]


# one promote at a time across DAG runs and workers (the registry aliases are shared state)
@task(outlets=[MODEL], multiple_outputs=False, pool=REGISTRY_POOL, max_active_tis_per_dag=1, **RETRY)
def promote(mlflow_run_id: str) -> dict:
    """Register the challenger, promote it if better; skipped on dry_run."""
    context = get_current_context()
    params = context["params"]
    if params.get("dry_run"):
        raise AirflowSkipException("dry_run: stopping before promote (nothing registered)")
    actor = getattr(context["dag_run"], "triggering_user_name", None) or "airflow"
    env = {ACTOR_ENV: f"{actor} (airflow)", REASON_ENV: (params.get("force_reason") or "").strip()}
    summary = _run_stages(("promote",), mlflow_run_id, env)["promote"]
    context["outlet_events"][MODEL].extra = {
        k: summary.get(k) for k in ("model_name", "version", "decision", "champion_version")}
    context["outlet_events"][MODEL].extra["mlflow_run_id"] = mlflow_run_id
    return summary


@teardown
@task(multiple_outputs=False, **RETRY, **store_queue())
def finish_mlflow_run(mlflow_run_id: str) -> dict:
    """Mark the MLflow run FINISHED, or FAILED if a stage failed (runs even after a failure)."""
    from genre_tasks.registry import tracking
    from genre_tasks.schema import Paths

    context = get_current_context()
    ti = context["ti"]
    states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id])
    states = states.get(ti.run_id, states)  # {run_id: {task_id: state}}
    failed = sorted(t for t, s in states.items() if t != ti.task_id and str(s) == "failed")
    not_run = sorted(t for t, s in states.items() if str(s) == "upstream_failed")
    root = project_root()
    paths = Paths(root)
    if failed:
        outcome = f"failed: {', '.join(failed)}" + (f" (not run: {', '.join(not_run)})" if not_run else "")
    else:
        outcome = "dry_run" if context["params"].get("dry_run") else "success"
    published = {"published": False}
    with stage_environment(root, None):
        if outcome == "success":
            from genre_tasks.registry import workspace as W

            ws = W.workspace(root, ti.run_id)
            if ws.params_file.exists():  # this worker made the run's workspace (the store's)
                with stage_environment(root, mlflow_run_id, lambda: W.tracking_env(root)):
                    W.materialise(ws, mlflow_run_id, paths)  # the run's final dvc.lock
            if ws.lock_file.exists():
                published = W.publish(ws)
                log.info("published the run into %s: %s", root, published)
        status = tracking.finish_pipeline_run(paths, mlflow_run_id, outcome, bool(failed))
    log.info("MLflow run %s -> %s (%s)", mlflow_run_id, status, outcome)
    return {"mlflow_run_id": mlflow_run_id, "status": status, "outcome": outcome,
            "published": published.get("published")}


@dag(
    dag_id=DAG_ID,
    dag_display_name="GENRE training",
    description="Ingest, validate, embed, train, evaluate and promote the GENRE recommender",
    doc_md=__doc__,
    schedule=_schedule(),
    start_date=datetime(2026, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    # runs never share files (a workspace each); 2 fit a 2-core box ($GENRE_TRAINING_MAX_ACTIVE_RUNS)
    max_active_runs=int(os.environ.get("GENRE_TRAINING_MAX_ACTIVE_RUNS", "2")),
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    tags=["genre", "training", "mlflow"],
)
def genre_training():
    run_id = start_mlflow_run()
    snapshot = snapshot_params(run_id)
    data = augment(run_id)
    chain(snapshot, ingest(run_id), validate(run_id), preprocess(run_id), data)
    # the shard plan needs only the params snapshot: it runs beside the data stages
    plan = embed_plan(run_id)
    snapshot >> plan
    encoded = embed_shard.partial(mlflow_run_id=run_id).expand(shard=plan)
    data >> encoded  # a shard encodes the items preprocess (and augment) wrote
    chain(encoded, embed(run_id), genre(run_id), train(run_id), evaluate(run_id), promote(run_id),
          finish_mlflow_run(run_id))


genre_training()
