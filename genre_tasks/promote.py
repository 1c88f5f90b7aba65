"""promote stage: register the selected model as a challenger and promote it only if it is
measurably better than the current champion on today's test split.

Steps (one MLflow run per pipeline run, see :mod:`genre_tasks.tracking`):

1. log the pipeline run: params, per-epoch training curves (child run per strategy), test
   metrics, plots/tables, dataset lineage;
2. log the selected model (data/model/selected.json) as a self-contained pyfunc
   (:mod:`genre_tasks.serving`), register it as a new version of ``model_name`` stamped with the
   git commit, params hash and data hashes, and point the ``challenger`` alias at it;
3. re-score, on the same test split and now, the challenger and the current ``@champion``
   (loaded from the registry, not its logged numbers). Without a champion the challenger
   must beat MostPop (fitted on the test-phase fit data) instead;
4. decide, before touching any alias. Promote only if
   - gain = challenger - reference on ``primary_metric`` >= ``min_effect``, and
   - a paired bootstrap over users (``bootstrap_samples`` resamples of the per-user
     differences, seeded) puts the one-sided lower ``confidence`` bound of the gain above 0, and
   - against a champion: no guardrail metric (present in both results) drops by more than its
     tolerance (guardrails guard against regressing from what is in production; against
     MostPop, with no champion yet, only the first two rules apply);
   ``force`` promotes regardless and records ``decision=forced`` with who and why;
5. record the decision on the model version (tags + description), then move ``@champion``
   (the one it replaces gets ``@previous_champion``, for a one-command rollback), print the
   decision and write metrics/promote.json.

Aliases only, never stages. If anything fails before step 5 the champion alias is untouched
(the version is tagged ``decision=failed``); a rejected challenger keeps only ``@challenger``.
Re-running with the same model and data reuses its registered version (idempotent).
"""
from __future__ import annotations

import getpass
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from genre_tasks import config, io, logs
from genre_tasks import schema as S
from genre_tasks.errors import StageError

log = logging.getLogger("genre.promote")

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous_champion"
#: who forced a promotion (the Airflow DAG sets it to the triggering user), else the OS user
ACTOR_ENV = "GENRE_PROMOTE_ACTOR"
#: why (when no ``reason`` argument / --reason is given)
REASON_ENV = "GENRE_PROMOTE_REASON"


@dataclass(frozen=True)
class PromoteParams:
    model_name: str = "genre-recommender"
    primary_metric: str = "ndcg@10"
    min_effect: float = 0.002
    confidence: float = 0.95
    bootstrap_samples: int = 2000
    seed: int = 42
    guardrails: dict[str, float] = field(default_factory=dict)
    force: bool = False  # not in params.yaml: set by `genre promote --force` / the DAG param

    def validate(self) -> None:
        if not self.model_name.strip():
            raise config.ParamsError("promote.model_name: empty")
        if not 0.5 <= self.confidence < 1.0:
            raise config.ParamsError(f"promote.confidence: {self.confidence} not in [0.5, 1)")
        if self.bootstrap_samples < 100:
            raise config.ParamsError(f"promote.bootstrap_samples: {self.bootstrap_samples} < 100")
        if self.min_effect < 0:
            raise config.ParamsError(f"promote.min_effect: {self.min_effect} < 0")
        for metric, tol in self.guardrails.items():
            if not isinstance(tol, (int, float)) or isinstance(tol, bool) or tol < 0:
                raise config.ParamsError(f"promote.guardrails.{metric}: {tol!r} is not a tolerance >= 0")


# --- the decision (pure) ----------------------------------------------------------------------
@dataclass
class Comparison:
    """Challenger vs reference on one metric, paired over the same units (users)."""

    metric: str
    challenger: float
    reference: float
    gain: float  # mean per-user difference (challenger - reference)
    ci_lower: float  # one-sided lower bound at ``confidence``
    ci_upper: float  # one-sided upper bound at ``confidence``
    p_value: float  # bootstrap share of resampled mean gains <= 0
    n_units: int
    confidence: float


def paired_bootstrap(challenger: np.ndarray, reference: np.ndarray, samples: int, seed: int,
                     confidence: float) -> tuple[float, float, float, float, int]:
    """Paired bootstrap of the mean difference over units present in both (finite values).

    Returns (mean gain, lower bound, upper bound, p-value-ish, n units): the bounds are the
    (1 - confidence) and confidence quantiles of ``samples`` resampled mean differences, the
    p-value the share of resampled means <= 0 (with the usual +1 correction).
    """
    a = np.asarray(challenger, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap: unaligned units {a.shape} vs {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    n = len(d)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), float("nan"), 0
    rng = np.random.default_rng(seed)
    means = np.empty(samples, dtype=np.float64)
    chunk = max(1, min(samples, 2_000_000 // max(n, 1)))
    for lo in range(0, samples, chunk):
        hi = min(samples, lo + chunk)
        means[lo:hi] = d[rng.integers(0, n, size=(hi - lo, n))].mean(axis=1)
    lower = float(np.quantile(means, 1.0 - confidence))
    upper = float(np.quantile(means, confidence))
    p = float((np.count_nonzero(means <= 0.0) + 1) / (samples + 1))
    return float(d.mean()), lower, upper, p, n


def compare(metric: str, chal, ref, p: PromoteParams) -> Comparison:
    """``chal`` / ``ref`` are evaluation.EvalResult of the same EvalData."""
    if metric not in chal.metrics or metric not in ref.metrics:
        raise StageError(f"promote.primary_metric: '{metric}' was not computed "
                         f"(available: {sorted(k for k in chal.metrics if not k.endswith('_se'))})")
    a, b = chal.per_user.get(metric), ref.per_user.get(metric)
    if a is None or b is None:
        raise StageError(f"no per-user values of '{metric}': cannot run the paired test")
    ua, ub = chal.users.get(metric), ref.users.get(metric)
    if ua is not None and ub is not None and not np.array_equal(ua, ub):
        raise StageError(f"'{metric}': the two models were scored on different users")
    gain, lo, hi, pv, n = paired_bootstrap(a, b, p.bootstrap_samples, p.seed, p.confidence)
    return Comparison(metric, float(chal.metrics[metric]), float(ref.metrics[metric]), gain, lo, hi,
                      pv, n, p.confidence)


@dataclass
class Decision:
    decision: str  # promoted | rejected | forced | unchanged
    promote: bool
    reference: str  # "champion v3" | "MostPop"
    primary: Comparison | None
    guardrails: dict[str, dict] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    compared: dict[str, dict[str, float]] = field(default_factory=dict)
    """{"challenger": {metric: mean}, "reference": {...}}: the main metrics of both, as measured."""


#: metrics recorded side by side on the version (those computed for the split)
COMPARED_METRICS = ("ndcg@10", "recall@10", "recall@20", "mrr", "hr@10", "auc", "imp_ndcg@10",
                    "cold_ndcg@10", "cold_recall@10", "n_users", "n_impressions", "n_cold_users")


def compared_metrics(chal: dict, ref: dict) -> dict[str, dict[str, float]]:
    def pick(m: dict) -> dict[str, float]:
        return {k: float(m[k]) for k in COMPARED_METRICS if k in m and np.isfinite(m[k])}

    return {"challenger": pick(chal), "reference": pick(ref)}


def guardrail_checks(chal: dict, ref: dict, guardrails: dict[str, float]) -> dict[str, dict]:
    """Per guardrail metric present (finite) in both: drop = reference - challenger <= tol."""
    out = {}
    for metric, tol in sorted(guardrails.items()):
        a, b = chal.get(metric), ref.get(metric)
        if a is None or b is None or not (np.isfinite(a) and np.isfinite(b)):
            continue
        drop = float(b) - float(a)
        out[metric] = {"challenger": float(a), "reference": float(b), "drop": drop,
                       "tolerance": float(tol), "ok": bool(drop <= tol + 1e-12)}
    return out


def decide(chal, ref, reference: str, p: PromoteParams, force: bool = False,
           guardrails: bool = True) -> Decision:
    """The promotion rule of the module docstring on two EvalResults of the same EvalData.

    ``guardrails`` False (the reference is the MostPop baseline, not a champion) skips them.
    """
    cmp = compare(p.primary_metric, chal, ref, p)
    guards = guardrail_checks(chal.metrics, ref.metrics, p.guardrails) if guardrails else {}
    both = compared_metrics(chal.metrics, ref.metrics)
    reasons = []
    if not (np.isfinite(cmp.gain) and cmp.gain >= p.min_effect - 1e-12):
        reasons.append(f"gain {cmp.gain:+.4f} on {cmp.metric} < min_effect {p.min_effect:g}")
    if not (np.isfinite(cmp.ci_lower) and cmp.ci_lower > 0):
        reasons.append(f"{cmp.confidence:.0%} lower bound of the gain {cmp.ci_lower:+.4f} <= 0 "
                       f"(n={cmp.n_units}, p={cmp.p_value:.3f})")
    for metric, g in guards.items():
        if not g["ok"]:
            reasons.append(f"guardrail {metric} dropped {g['drop']:.4f} > {g['tolerance']:g}")
    if force:
        return Decision("forced", True, reference, cmp, guards,
                        reasons or ["would have passed the rule anyway"], both)
    if reasons:
        return Decision("rejected", False, reference, cmp, guards, reasons, both)
    return Decision("promoted", True, reference, cmp, guards,
                    [f"gain {cmp.gain:+.4f} >= {p.min_effect:g}, lower bound {cmp.ci_lower:+.4f} > 0, "
                     "guardrails ok"], both)


def describe(d: Decision, version: str, strategy: str, split: str, force_by: str = "",
             force_reason: str = "") -> str:
    """The short human-readable paragraph stored as the version description."""
    c = d.primary
    head = {"promoted": "PROMOTED to @champion", "rejected": "REJECTED (stays @challenger)",
            "forced": "FORCED to @champion", "unchanged": "UNCHANGED (already @champion)"}[d.decision]
    text = f"v{version} ({strategy}): {head}."
    if c is not None:
        text += (f" On the {split} test split ({c.n_units} users), {c.metric} {c.challenger:.4f} vs "
                 f"{d.reference} {c.reference:.4f}: gain {c.gain:+.4f}, {c.confidence:.0%} one-sided "
                 f"bounds [{c.ci_lower:+.4f}, {c.ci_upper:+.4f}], bootstrap p={c.p_value:.3f}.")
    if d.guardrails:
        text += " Guardrails: " + ", ".join(
            f"{m} {g['challenger']:.4f} vs {g['reference']:.4f} ({'ok' if g['ok'] else 'FAILED'})"
            for m, g in d.guardrails.items()) + "."
    if d.decision == "forced":
        text += f" Forced by {force_by or 'unknown'}: {force_reason or 'no reason given'}."
    text += " Reason: " + "; ".join(d.reasons) + "."
    return text


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


def _find_version(cl, name: str, model_md5: str, data_hash: str):
    for mv in cl.search_model_versions(f"name='{name}'"):
        if mv.tags.get("model_md5") == model_md5 and mv.tags.get("data_hash") == data_hash:
            return mv
    return None


def _set_version_tags(cl, name: str, version: str, tags: dict[str, Any]) -> None:
    from genre_tasks.tracking import metric_key

    for k, v in tags.items():
        cl.set_model_version_tag(name, version, metric_key(k), str(v)[:5000])


#: tags written by a decision (a re-decision on a reused version removes the stale ones)
DECISION_TAG_PREFIXES = ("decision", "compared_against", "champion_version_before", "reasons",
                         "primary_metric", "challenger.", "reference.", "gain", "ci_lower", "ci_upper",
                         "confidence", "p_value", "n_users", "guardrail.", "forced_by", "force_reason")


def _replace_decision_tags(cl, name: str, version: str, tags: dict[str, str]) -> None:
    from genre_tasks.tracking import metric_key

    new = {metric_key(k) for k in tags}
    for key in cl.get_model_version(name, version).tags:
        if key not in new and key.startswith(DECISION_TAG_PREFIXES):
            cl.delete_model_version_tag(name, version, key)
    _set_version_tags(cl, name, version, tags)


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
    missing = [n for n in ("model.pt", "meta.json") if not (model_dir / n).exists()]
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


def run(p: PromoteParams, paths: S.Paths, force: bool = False, reason: str | None = None,
        params: dict | None = None) -> dict:
    """The promote stage (see the module docstring). Returns the metrics/promote.json record."""
    import mlflow

    from genre_tasks import baselines, evaluation, serving, tracking
    from genre_tasks import data as D

    force = force or p.force
    with logs.stage("promote") as slog:
        strategy, model_dir = _selected_model(paths)
        slog.read(model_dir, f"selected strategy {strategy}")
        dataset = D.Dataset.load(paths)
        fit, ev = dataset.phase("test")
        slog.read(paths.processed_dir, f"test phase: {len(ev.users)} users")
        split = tracking.split_mode(paths)
        name = p.model_name
        lineage = tracking.lineage_tags(paths, params)
        model_md5 = io.file_md5(model_dir / "model.pt")

        with tracking.pipeline_run(paths, params) as run_id:
            summary = tracking.log_pipeline(run_id, paths, params)
            slog.logger.info("MLflow run %s: %d params, %d test metrics, artifacts %s", run_id,
                             summary.get("params", 0), summary.get("test_metrics", 0),
                             summary.get("artifacts"))
            cl = tracking.client(paths)
            _ensure_registered_model(cl, name)
            existing = _find_version(cl, name, model_md5, lineage["data_hash"])
            if existing is not None:
                version = str(existing.version)
                slog.logger.info("model unchanged since v%s (same model.pt and data): reusing it", version)
            else:
                with tempfile.TemporaryDirectory(prefix="genre-bundle-") as work:
                    info = serving.log_model(
                        model_dir, fit, dataset.items[S.TITLE].astype(str).tolist(), Path(work),
                        info={"git_commit": lineage["git_commit"], "data_hash": lineage["data_hash"],
                              "params_hash": lineage["params_hash"], "strategy": strategy},
                        tags={**lineage, "model_md5": model_md5, "strategy": strategy})
                mv = mlflow.register_model(info.model_uri, name, tags={"model_md5": model_md5})
                version = str(mv.version)
                slog.logger.info("registered %s v%s from %s", name, version, info.model_uri)
            _set_version_tags(cl, name, version, {
                **lineage, "model_md5": model_md5, "strategy": strategy, "run_id": run_id})
            cl.set_registered_model_alias(name, CHALLENGER, version)
            champion_before = _alias_version(cl, name, CHAMPION)

            try:
                record = _decide_and_record(p, paths, cl, name, version, strategy, champion_before,
                                            fit, ev, split, force, reason, evaluation, baselines,
                                            serving)
            except Exception as exc:
                _set_version_tags(cl, name, version, {"decision": "failed",
                                                      "reasons": f"{type(exc).__name__}: {exc}"})
                raise
            record.update({"run_id": run_id, "git_commit": lineage["git_commit"],
                           "params_hash": lineage["params_hash"], "data_hash": lineage["data_hash"]})
            tracking.set_tags(run_id, {"promote.decision": record["decision"],
                                       "promote.version": version}, paths)
            tracking.log_metrics(run_id, {k: record[k] for k in ("gain", "ci_lower", "ci_upper", "p_value")
                                          if k in record}, paths, prefix="promote.")
        io.write_json(record, paths.metrics("promote"))
        slog.wrote(paths.metrics("promote"), record["decision"])
        print(record["description"])
        return record


def _decide_and_record(p, paths, cl, name, version, strategy, champion_before, fit, ev, split,
                       force, reason, evaluation, baselines, serving) -> dict:
    """Re-score, decide, tag, then (and only then) move the champion alias."""
    force_by = force_reason = ""
    if force:
        force_by = os.environ.get(ACTOR_ENV) or _user()
        force_reason = reason or os.environ.get(REASON_ENV) or "no reason given"
    if champion_before == version:
        d = Decision("unchanged", False, f"champion v{champion_before}", None, {},
                     ["this model version is already the champion"])
    else:
        chal = serving.load(f"models:/{name}/{version}").recommender
        res_c = evaluation.evaluate_recommender(_Named(chal, f"challenger v{version}"), fit, ev, p.seed)
        if champion_before is None:
            ref_name, ref = "MostPop", baselines.MostPop().fit(fit)
        else:
            ref_name = f"champion v{champion_before}"
            ref = _Named(serving.load(f"models:/{name}/{champion_before}").recommender, ref_name)
        res_r = evaluation.evaluate_recommender(ref, fit, ev, p.seed)
        d = decide(res_c, res_r, ref_name, p, force=force, guardrails=champion_before is not None)

    text = describe(d, version, strategy, split, force_by, force_reason)
    # the decision is made: record it on the version, then (and only then) move the alias.
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
        "compared_metrics": d.compared, "description": text}
    if d.primary is not None:
        record.update({k: v for k, v in asdict(d.primary).items() if k != "confidence"})
        record["confidence"] = d.primary.confidence
    if force:
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
    from genre_tasks import tracking

    paths = paths or S.Paths(".")
    cl = tracking.client(paths)
    from mlflow.exceptions import MlflowException

    try:
        rm = cl.get_registered_model(model_name)
    except MlflowException:
        return f"no registered model '{model_name}' at {tracking.tracking_uri(paths)}"
    by_version: dict[str, list[str]] = {}
    for alias, v in (rm.aliases or {}).items():
        by_version.setdefault(str(v), []).append(alias)
    versions = sorted(cl.search_model_versions(f"name='{model_name}'"), key=lambda mv: -int(mv.version))
    lines = [f"{model_name} ({tracking.tracking_uri(paths)})",
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
                                       "reference", "gain", "ci_lower", "p_value", "reasons")}
