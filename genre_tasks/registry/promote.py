"""promote stage: register the selected model as a challenger and promote it to @champion only
if it is measurably better than the best model of the run, on the same data.

1. **Checks, read-only** (:func:`preconditions`): the last validation passed and is the one the
   data was preprocessed from; every input train read is on disk unchanged and is what its
   producing stage recorded writing (:mod:`genre_tasks.manifests`); evaluate judged these same
   inputs and models. A forced promotion needs a reason. Any failure raises a StageError and
   changes no MLflow run, tag or alias.
2. **Judge, read-only**: the challenger's bundle is built in ``.cache/promote/`` and scored on the
   test split; the current ``@champion`` is loaded from the registry and scored on its *own*
   bundle (its vectors, item index and params, mapped onto today's catalogue by item id), never
   on today's files; the baselines come from the evaluate stage's per-user results (same split,
   same users, same tie-break seed).
3. **Decide** (:func:`decide`): the reference is the stronger of the champion and the best
   baseline of the run (EASE, ItemKNN, MostPop, ...). Promote only if
   - gain = challenger - reference on ``primary_metric`` >= ``min_effect``, and
   - a paired bootstrap over users (``bootstrap_samples`` resamples, seeded) puts the one-sided
     lower ``confidence`` bound of the gain above 0, and
   - against a champion: no guardrail metric drops by more than its tolerance.
   ``force`` (operator override, with who and why) skips these rules but never the floor: a
   challenger significantly worse than the best baseline is never promoted.
4. **Record** under a registry lock: one MLflow run of the pipeline; the version is found by its
   content key (:func:`genre_tasks.registry.serving.content_key`: weights, serving params, item table,
   vectors, code) or registered with that key set atomically, so a re-run after a kill or a
   concurrent promote never makes a second version of one model, and a behaviour change with
   identical weights makes a new one. Decision tags and description first, then the aliases
   (``@challenger``; ``@champion`` only if promoted, the outgoing one keeps
   ``@previous_champion``); metrics/promote.json.

Aliases only, never stages. Gate settings (``promote.*``) come from the committed params only
(:func:`genre_tasks.config.guard_overrides`).
"""
from __future__ import annotations

import contextlib
import getpass
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from genre_tasks import config, io, logs, manifests
from genre_tasks import schema as S
from genre_tasks.errors import StageError
from genre_tasks.registry.gate import SAME_MODEL_BASELINE, Decision, PromoteParams, decide, describe

log = logging.getLogger("genre.promote")

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous_champion"
#: who forced a promotion (the Airflow DAG sets it to the triggering user), else the OS user
ACTOR_ENV = config.ACTOR_ENV
#: why (when no ``reason`` argument / --reason is given)
REASON_ENV = config.REASON_ENV
#: version tag: sha256 of everything that changes predictions (serving.content_key)
CONTENT_KEY = "content_key"


# --- registry helpers -------------------------------------------------------------------------
def _alias_version(cl, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(cl.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _ensure_registered_model(cl, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        cl.get_registered_model(name)
    except MlflowException:
        try:
            cl.create_registered_model(
                name, description="GENRE-style recommender (items understood through language-model "
                                  "text embeddings). @champion serves; see version tags for decisions.")
        except MlflowException:
            cl.get_registered_model(name)  # created concurrently


def _find_version(cl, name: str, key: str):
    """The registered version whose ``content_key`` tag is ``key`` (set atomically with the
    version by ``register_model``), else None."""
    for mv in cl.search_model_versions(f"name='{name}'"):
        if mv.tags.get(CONTENT_KEY) == key:
            return mv
    return None


def _tag_values(tags: dict[str, Any]) -> dict[str, str]:
    """Registry tag keys/values as MLflow stores them (keys sanitised, values <= 5000 chars)."""
    from genre_tasks.registry.tracking import metric_key

    return {metric_key(k): str(v)[:5000] for k, v in tags.items()}


def _set_version_tags(cl, name: str, version: str, tags: dict[str, Any],
                      current: dict[str, str] | None = None) -> None:
    """Set the tags the version does not hold yet (with these values): one request per changed
    tag, none for the ones already there (a re-run, or tags given at creation). ``current``:
    the version's tags if the caller has just read them."""
    if current is None:
        current = dict(cl.get_model_version(name, version).tags or {})
    for k, v in _tag_values(tags).items():
        if current.get(k) != v:
            cl.set_model_version_tag(name, version, k, v)


#: tags written by a decision (a re-decision on a reused version removes the stale ones)
DECISION_TAG_PREFIXES = ("decision", "compared_against", "champion_version_before", "reasons",
                         "primary_metric", "challenger.", "reference.", "gain", "ci_lower", "ci_upper",
                         "confidence", "p_value", "n_users", "guardrail.", "forced_by", "force_reason",
                         "best_baseline", "vs_best_baseline.", "vs_champion.")


def _replace_decision_tags(cl, name: str, version: str, tags: dict[str, str]) -> None:
    from genre_tasks.registry.tracking import metric_key

    new = {metric_key(k) for k in tags}
    current = dict(cl.get_model_version(name, version).tags or {})
    for key in list(current):
        if key not in new and key.startswith(DECISION_TAG_PREFIXES):
            cl.delete_model_version_tag(name, version, key)
            del current[key]
    _set_version_tags(cl, name, version, tags, current)


def _fmt(x: float) -> str:
    return f"{x:.6f}" if isinstance(x, float) and np.isfinite(x) else str(x)


def decision_tags(d: Decision, champion_before: str | None, force_by: str = "",
                  force_reason: str = "") -> dict[str, str]:
    tags = {"decision": d.decision, "compared_against": d.reference,
            "champion_version_before": champion_before or "none",
            "reasons": " | ".join(d.reasons)}
    c = d.primary
    if c is not None:
        tags.update({"primary_metric": c.metric, f"challenger.{c.metric}": _fmt(c.challenger),
                     f"reference.{c.metric}": _fmt(c.reference), "gain": _fmt(c.gain),
                     "ci_lower": _fmt(c.ci_lower), "ci_upper": _fmt(c.ci_upper),
                     "confidence": str(c.confidence), "p_value": _fmt(c.p_value),
                     "n_users": str(c.n_units)})
    for side, metrics in d.compared.items():
        for m, v in metrics.items():
            tags[f"{side}.{m}"] = str(int(v)) if m.startswith("n_") else _fmt(v)
    for label, cmp in (("vs_best_baseline", d.vs_baseline), ("vs_champion", d.vs_champion)):
        if cmp is not None:
            tags.update({f"{label}.{cmp.metric}": _fmt(cmp.reference), f"{label}.gain": _fmt(cmp.gain),
                         f"{label}.ci_lower": _fmt(cmp.ci_lower), f"{label}.ci_upper": _fmt(cmp.ci_upper)})
    if d.best_baseline:
        tags["best_baseline"] = d.best_baseline
    for m, g in d.guardrails.items():
        tags[f"guardrail.{m}"] = (f"{'ok' if g['ok'] else 'FAILED'} drop={g['drop']:.6f} "
                                  f"tol={g['tolerance']:g}")
    if d.decision == "forced":
        tags["forced_by"] = force_by or "unknown"
        tags["force_reason"] = force_reason or "no reason given"
    return tags


# --- the stage ------------------------------------------------------------------------------------
def _selected_model(paths: S.Paths) -> tuple[str, Path]:
    f = paths.model_dir / "selected.json"
    if not f.exists():
        raise StageError(f"{f}: missing; run the train stage first")
    strategy = io.read_json(f).get("strategy")
    model_dir = paths.model_dir / str(strategy)
    if (model_dir / "ease_weights.npy").exists():
        needed = ("ease_weights.npy", "meta.json")
    elif (model_dir / "ease").is_dir() or (model_dir / "tower").is_dir():  # fusion: its two components
        needed = ("meta.json", "ease/ease_weights.npy", "ease/meta.json", "tower/model.pt", "tower/meta.json")
    else:
        needed = ("model.pt", "meta.json")
    missing = [n for n in needed if not (model_dir / n).exists()]
    if not strategy or missing:
        raise StageError(f"{f}: selected strategy {strategy!r} has no trained model in {model_dir} "
                         f"(missing {missing})")
    return str(strategy), model_dir


class _Named:
    """A recommender under another name (what the evaluation tables show)."""

    def __init__(self, rec, name: str) -> None:
        self.rec, self.name = rec, name

    def fit(self, data):
        return self

    def score(self, histories, data):
        return self.rec.score(histories, data)


def preconditions(paths: S.Paths) -> list[str]:
    """Why the model in data/model may not be judged now (empty: it may). Read-only.

    * the last validation passed and it is the one preprocess read (a failed or newer
      validation means the data the user asked for is not what the model was trained on);
    * every input train recorded reading is on disk unchanged and is what its producing stage
      recorded writing (vectors, processed tables, item index, genre predictions);
    * the evaluate stage judged exactly these inputs and models, and its per-user results on
      disk are the ones it wrote (the baselines the gate compares with).
    """
    problems = []
    summary = paths.validation_summary
    if not summary.exists():
        problems.append(f"{summary}: missing: the last validation failed or never ran "
                        f"(see {paths.validation_dir / 'failure.json'}); fix the input and re-run the pipeline")
    elif not io.read_json(summary).get("success"):
        problems.append(f"{summary}: the last validation did not pass")
    problems += manifests.check_consumer(paths, "preprocess", prefixes=("data/validation/",))
    problems += manifests.check_consumer(paths, "train")
    problems += manifests.check_consumer(paths, "evaluate")
    written = (manifests.load(paths, "evaluate") or {}).get("writes") or {}
    per_user = paths.root / "data" / "eval" / "per_user.parquet"
    rel = manifests.relative(paths, per_user)
    if rel not in written:
        problems.append(f"{rel}: no record of the evaluate stage writing it; re-run evaluate")
    elif not per_user.exists() or io.file_md5(per_user) != written[rel]:
        problems.append(f"{rel}: not the file the evaluate stage wrote; re-run evaluate")
    return problems


def baseline_results(paths: S.Paths) -> tuple[dict, int]:
    """The baselines the evaluate stage measured on this split, as EvalResults with their
    per-unit values ({name: EvalResult}), and the tie-break seed evaluate used."""
    import pandas as pd

    from genre_tasks.evaluation import protocol as E

    doc = io.read_json(paths.metrics("evaluate"))
    kinds = doc.get("kinds") or {}
    frame = pd.read_parquet(paths.root / "data" / "eval" / "per_user.parquet")
    out = {}
    for name, kind in kinds.items():
        if kind != "baseline":
            continue
        rows = frame[frame["model"] == name]
        per_user, users = {}, {}
        for group, (names, _) in E.GROUPS.items():
            part = rows[rows["group"] == group]
            for m in names:
                if m in part.columns and len(part):
                    per_user[m] = part[m].to_numpy(np.float64)
                    users[m] = part["user_idx"].to_numpy(np.int64)
        metrics = {k: float("nan") if v is None else v for k, v in (doc["models"].get(name) or {}).items()}
        out[name] = E.EvalResult(name, metrics, per_user, users)
    return out, int(doc.get("seed", 42))


@contextlib.contextmanager
def registry_lock(paths: S.Paths, name: str, timeout: float = 3600.0):
    """Serialise promotes into one registry: a file lock beside the sqlite tracking store (so
    promotes from different workspaces of one project, e.g. one per DAG run, share it), else
    under the project's .cache/. On several Airflow workers the promote task also runs in the
    one-slot pool ``genre_registry``; registration is idempotent on the content key either way."""
    from filelock import FileLock

    from genre_tasks.registry import tracking_store

    db = tracking_store.sqlite_file(tracking_store.tracking_uri(paths))
    lock = (db.parent / f".{db.name}.promote-{name}.lock") if db is not None \
        else paths.root / ".cache" / f"promote-{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock), timeout=timeout):
        yield


def _work_dir(paths: S.Paths) -> Path:
    """Scratch space for bundles: .cache/promote/ (swept at every start under the lock, so a
    promote killed while building a bundle leaves nothing behind for long)."""
    import shutil

    base = paths.root / ".cache" / "promote"
    if base.exists():
        for stale in base.iterdir():
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    base.mkdir(parents=True, exist_ok=True)
    return base


def run(p: PromoteParams, paths: S.Paths, force: bool = False, reason: str | None = None,
        params: dict | None = None) -> dict:
    """The promote stage (see the module docstring). Returns the metrics/promote.json record.

    Everything before the decision is read-only (checks, bundle in .cache/, scoring); a refusal
    (StageError) changes no run, tag or alias.
    """
    from genre_tasks.evaluation import protocol as evaluation
    from genre_tasks.registry import serving
    from genre_tasks.registry import provenance, stage_logging, tracking, tracking_store
    from genre_tasks.models import views as D
    from genre_tasks.registry import workspace as W

    force = force or p.force
    with logs.stage("promote") as slog:
        strategy, model_dir = _selected_model(paths)
        slog.read(model_dir, f"selected strategy {strategy}")
        force_by = force_reason = ""
        if force:
            force_by = os.environ.get(ACTOR_ENV) or _user()
            force_reason = (reason or os.environ.get(REASON_ENV) or "").strip()
            if not force_reason:
                raise config.ParamsError("a forced promotion needs a reason (--reason / the trigger "
                                         "form's force_reason); nothing was registered")
        problems = preconditions(paths)
        if problems:
            raise StageError("promote refused; nothing registered, the champion is untouched:\n- "
                             + "\n- ".join(problems))
        baselines, seed = baseline_results(paths)
        if not baselines:
            raise StageError(f"{paths.metrics('evaluate')}: no baseline was evaluated; the gate compares the "
                             "challenger with the best baseline of the run (evaluate.baselines)")
        dataset = D.Dataset.load(paths)
        fit, ev = dataset.phase("test")
        slog.read(paths.processed_dir, f"test phase: {len(ev.users)} users")
        split = provenance.split_mode(paths)
        name = p.model_name
        lineage = provenance.lineage_tags(paths, params)  # data hashes: what train read
        tracking_store.require_store(paths)

        with registry_lock(paths, name):
            work = Path(tempfile.mkdtemp(prefix="bundle-", dir=_work_dir(paths)))
            bundle = serving.build_bundle(
                model_dir, fit, dataset.items[S.TITLE].astype(str).tolist(), work / serving.BUNDLE,
                info={"git_commit": lineage["git_commit"], "data_hash": lineage["data_hash"],
                      "params_hash": lineage["params_hash"], "strategy": strategy})
            key = serving.content_key(bundle)
            chal_model = serving.load_local(bundle)
            res_c = evaluation.evaluate_recommender(_Named(chal_model, "challenger"), fit, ev, seed)
            _same_as_evaluated(paths, strategy, res_c, p.primary_metric)
            cl = tracking_store.client(paths)
            existing = _find_version(cl, name, key) if _registered(cl, name) else None
            champion_before = _alias_version(cl, name, CHAMPION)
            version = str(existing.version) if existing is not None else None
            if champion_before is not None and champion_before == version:
                d = Decision("unchanged", False, f"champion v{champion_before}", None, {},
                             ["this model (same content key) is already the champion"])
            else:
                champion = None
                if champion_before is not None:  # judged on its own bundle: vectors, items, params
                    champion = evaluation.evaluate_recommender(
                        _Named(serving.load(f"models:/{name}/{champion_before}", cl), f"champion v{champion_before}"),
                        fit, ev, seed)
                d = decide(res_c, baselines, p, champion, f"champion v{champion_before}", force=force,
                           itself=SAME_MODEL_BASELINE.get(strategy))
            slog.logger.info("decision: %s vs %s (%s)", d.decision, d.reference, "; ".join(d.reasons))

            # --- the decision is made: now (and only now) write to MLflow -----------------------
            with tracking.pipeline_run(paths, params) as run_id:
                summary = stage_logging.log_pipeline(run_id, paths, params)
                slog.logger.info("MLflow run %s: %d params, %d test metrics, artifacts %s (stages "
                                 "logged live by their tasks: %s)", run_id, summary.get("params", 0),
                                 summary.get("test_metrics", 0), summary.get("artifacts"),
                                 ", ".join(summary["logged_live"]) or "none")
                _ensure_registered_model(cl, name)
                version_tags = {**lineage, CONTENT_KEY: key, "strategy": strategy, "run_id": run_id}
                if version is None:
                    info = serving.log_model(None, fit, [], work, tags={**lineage, CONTENT_KEY: key,
                                                                        "strategy": strategy})
                    # the run's own record (params snapshot hash, dvc.lock md5: genre lineage /
                    # genre checkout) goes onto the version that this run registered (not the
                    # dvc.lock md5: the run's lock is final only after promote; `genre lineage`
                    # reads it from the run)
                    run_tags = cl.get_run(run_id).data.tags
                    if W.PARAMS_HASH_TAG in run_tags:
                        version_tags[W.PARAMS_HASH_TAG] = run_tags[W.PARAMS_HASH_TAG]
                    # the content key (and the lineage) are set with the version, in one
                    # transaction: a re-run after a kill anywhere below finds this version instead
                    # of registering a second one (the client API: mlflow.register_model prints
                    # "already exists" to stderr, which Airflow shows at error level)
                    # ... and so is the decision (a new version is never "unchanged"): _record
                    # below then finds its tags in place, one registry request instead of ~40
                    at_creation = {**version_tags,
                                   **decision_tags(d, champion_before, force_by, force_reason)}
                    version = str(cl.create_model_version(name, info.model_uri, run_id=run_id,
                                                          tags=_tag_values(at_creation),
                                                          model_id=info.model_id).version)
                    slog.logger.info("registered %s v%s from %s", name, version, info.model_uri)
                else:
                    slog.logger.info("model unchanged since v%s (same content key): reusing it", version)
                current = dict(cl.get_model_version(name, version).tags or {})
                if not current.get(serving.ARTIFACTS_TAG):
                    # the files as the store holds them now; every later load checks against it
                    current[serving.ARTIFACTS_TAG] = serving.record_artifacts_digest(cl, name, version, work)
                _set_version_tags(cl, name, version, version_tags, current)  # no-op unless reused
                cl.set_registered_model_alias(name, CHALLENGER, version)
                record = _record(p, cl, name, version, strategy, champion_before, d, split, force_by,
                                 force_reason)
                record.update({"run_id": run_id, "git_commit": lineage["git_commit"],
                               "params_hash": lineage["params_hash"], "data_hash": lineage["data_hash"],
                               "content_key": key})
                tracking.set_tags(run_id, {"promote.decision": record["decision"],
                                           "promote.version": version}, paths)
                tracking.log_metrics(run_id, {k: record[k] for k in ("gain", "ci_lower", "ci_upper", "p_value")
                                              if k in record}, paths, prefix="promote.")
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        io.write_json(record, paths.metrics("promote"))
        slog.wrote(paths.metrics("promote"), record["decision"])
        print(record["description"])
        return record


def _same_as_evaluated(paths: S.Paths, strategy: str, res, metric: str) -> None:
    """The registered artifact must score what the evaluate stage measured for the strategy."""
    measured = ((io.read_json(paths.metrics("evaluate")).get("models") or {}).get(strategy) or {}).get(metric)
    now = float(res.metrics.get(metric, float("nan")))
    if measured is None or not np.isfinite(now) or abs(float(measured) - now) > 1e-6:
        raise StageError(f"the bundle of {strategy} scores {metric} {now:.6f} on the test split but the "
                         f"evaluate stage measured {measured}: what would be registered is not what was "
                         "evaluated; re-run evaluate (nothing registered)")


def _registered(cl, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        cl.get_registered_model(name)
        return True
    except MlflowException:
        return False


def _record(p, cl, name, version, strategy, champion_before, d: Decision, split, force_by,
            force_reason) -> dict:
    """Tag the decision on the version, then (and only then) move the champion alias."""
    text = describe(d, version, strategy, split, force_by, force_reason)
    # "unchanged" keeps the record of the decision that made this version the champion.
    if d.decision != "unchanged":
        _replace_decision_tags(cl, name, version, decision_tags(d, champion_before, force_by, force_reason))
        cl.update_model_version(name, version, description=text)
    if d.promote:
        cl.set_registered_model_alias(name, CHAMPION, version)
        if champion_before is not None and champion_before != version:
            cl.set_registered_model_alias(name, PREVIOUS, champion_before)
    record: dict[str, Any] = {
        "model_name": name, "version": _int(version), "strategy": strategy, "split": split,
        "decision": d.decision, "promoted": d.decision in ("promoted", "forced"),
        "champion_version_before": _int(champion_before),
        "champion_version": _int(_alias_version(cl, name, CHAMPION)),
        "compared_against": d.reference, "reasons": d.reasons, "guardrails": d.guardrails,
        "compared_metrics": d.compared, "description": text, "best_baseline": d.best_baseline}
    if d.primary is not None:
        record.update({k: v for k, v in asdict(d.primary).items() if k != "confidence"})
        record["confidence"] = d.primary.confidence
    for label, cmp in (("vs_best_baseline", d.vs_baseline), ("vs_champion", d.vs_champion)):
        if cmp is not None:
            record[label] = asdict(cmp)
    if d.decision == "forced":
        record.update({"forced_by": force_by, "force_reason": force_reason})
    return record


def _int(version: str | None) -> int | None:
    """Registry versions as numbers in metrics/promote.json (None = no such version)."""
    return None if version is None else int(version)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


def registry_state(model_name: str, paths: S.Paths | None = None) -> str:
    """Markdown table of the registered versions: aliases, decision, primary metric, reason."""
    from genre_tasks.registry import tracking, tracking_store

    paths = paths or S.Paths(".")
    cl = tracking_store.client(paths)
    from mlflow.exceptions import MlflowException

    try:
        rm = cl.get_registered_model(model_name)
    except MlflowException:
        return f"no registered model '{model_name}' at {tracking_store.tracking_uri(paths)}"
    by_version: dict[str, list[str]] = {}
    for alias, v in (rm.aliases or {}).items():
        by_version.setdefault(str(v), []).append(alias)
    versions = sorted(cl.search_model_versions(f"name='{model_name}'"), key=lambda mv: -int(mv.version))
    lines = [f"{model_name} ({tracking_store.tracking_uri(paths)})",
             "| version | aliases | strategy | decision | metric: challenger vs reference | gain [lower bound] | reason |",
             "|---:|---|---|---|---|---|---|"]
    for mv in versions:
        t = mv.tags
        metric = t.get("primary_metric", "")
        key = tracking.metric_key(metric)
        value = (f"{metric} {_short(t.get(f'challenger.{key}'))} vs {t.get('compared_against', '?')} "
                 f"{_short(t.get(f'reference.{key}'))}") if metric else ""
        gain = f"{_short(t.get('gain'), sign=True)} [{_short(t.get('ci_lower'), sign=True)}]" if "gain" in t else ""
        reason = t.get("reasons", "")
        if t.get("decision") == "forced":
            reason = f"forced by {t.get('forced_by')}: {t.get('force_reason')}"
        lines.append(f"| {mv.version} | {', '.join(sorted(by_version.get(str(mv.version), []))) or '-'} | "
                     f"{t.get('strategy', '?')} | {t.get('decision', '?')} | {value} | {gain} | "
                     f"{reason.replace('|', '/')} |")
    return "\n".join(lines)


def _short(value: str | None, sign: bool = False) -> str:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "?"
    return f"{f:+.4f}" if sign else f"{f:.4f}"


def registry_main(params: dict, paths: S.Paths) -> int:
    """`genre registry`: print :func:`registry_state` of promote.model_name."""
    name = (params.get("promote") or {}).get("model_name", PromoteParams.model_name)
    print(registry_state(name, paths))
    return 0


def main(params: dict, paths: S.Paths, force: bool = False, reason: str | None = None) -> dict:
    p = config.section(PromoteParams, "promote", params)
    record = run(p, paths, force=force, reason=reason, params=params)
    return {k: record.get(k) for k in ("model_name", "version", "decision", "champion_version_before",
                                       "champion_version", "compared_against", "metric", "challenger",
                                       "reference", "gain", "ci_lower", "p_value", "best_baseline",
                                       "reasons")}
