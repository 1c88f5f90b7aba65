"""The promotion rule, pure: paired comparisons over users and the decision of the gate.

No MLflow, no files: :func:`decide` takes evaluation results (``metrics`` means, ``per_user``
values and their ``users``, as :class:`genre_tasks.evaluation.protocol.EvalResult`) of the challenger,
the current champion and the baselines of the run on the same test units, and returns a
:class:`Decision` with its reasons. :mod:`genre_tasks.registry.promote` gathers those results, calls it
and records the decision in the registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from genre_tasks.errors import StageError

if TYPE_CHECKING:  # the gate's settings live with the stage that reads them
    from genre_tasks.registry.promote import PromoteParams


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
    reference: str  # the stronger of the champion and the best baseline: "champion v3" | "EASE (baseline)"
    primary: Comparison | None  # challenger vs ``reference``
    guardrails: dict[str, dict] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    compared: dict[str, dict[str, float]] = field(default_factory=dict)
    """{"challenger": {metric: mean}, "reference": {...}}: the main metrics of both, as measured."""
    best_baseline: str = ""  # name of the strongest baseline of the run on the primary metric
    vs_baseline: Comparison | None = None  # challenger vs the best baseline
    vs_champion: Comparison | None = None  # challenger vs the current champion (None: no champion)


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


def best_of(results: dict, metric: str) -> str:
    """Name of the result with the highest mean ``metric`` (first on ties, NaN last)."""
    def key(name):
        v = float(results[name].metrics.get(metric, float("nan")))
        return v if np.isfinite(v) else -np.inf

    return max(results, key=key)


#: the baseline that IS the challenger when a classical strategy is registered: it is left out
#: of the reference (a model cannot beat itself) but still counts for the floor
SAME_MODEL_BASELINE = {"ease": "EASE"}


def decide(chal, baselines: dict, p: PromoteParams, champion=None, champion_name: str = "",
           force: bool = False, itself: str | None = None) -> Decision:
    """The gate, on EvalResults of the same EvalData (the module docstring has the rule).

    ``baselines`` ({name: EvalResult}, at least one) are the baselines the evaluate stage
    measured on this split; ``champion`` the current champion re-scored on its own artifacts
    (None: no champion yet). The reference is the stronger of the champion and the best
    baseline; the challenger must beat it by a significant margin, and against a champion the
    guardrails hold too. ``force`` skips those rules (recorded as forced) but never the floor:
    a challenger significantly worse than the best baseline is never promoted.
    """
    if not baselines:
        raise StageError("no baseline results: the gate compares with the best baseline of the run")
    metric = p.primary_metric
    floor_best = best_of(baselines, metric)
    vs_floor = compare(metric, chal, baselines[floor_best], p)
    others = {k: v for k, v in baselines.items() if k != itself} or baselines
    best = best_of(others, metric)
    vs_base = compare(metric, chal, others[best], p)
    vs_champ = compare(metric, chal, champion, p) if champion is not None else None
    base_label = f"{best} (baseline)"
    if champion is not None and (float(champion.metrics[metric]) >= float(others[best].metrics[metric])
                                 or not np.isfinite(float(others[best].metrics[metric]))):
        reference, ref_res, cmp = champion_name, champion, vs_champ
    else:
        reference, ref_res, cmp = base_label, others[best], vs_base
    guards = guardrail_checks(chal.metrics, champion.metrics, p.guardrails) if champion is not None else {}
    both = compared_metrics(chal.metrics, ref_res.metrics)
    reasons = []
    if not (np.isfinite(cmp.gain) and cmp.gain >= p.min_effect - 1e-12):
        reasons.append(f"gain {cmp.gain:+.4f} on {metric} vs {reference} < min_effect {p.min_effect:g}")
    if not (np.isfinite(cmp.ci_lower) and cmp.ci_lower > 0):
        reasons.append(f"{cmp.confidence:.0%} lower bound of the gain vs {reference} {cmp.ci_lower:+.4f} <= 0 "
                       f"(n={cmp.n_units}, p={cmp.p_value:.3f})")
    for m, g in guards.items():
        if not g["ok"]:
            reasons.append(f"guardrail {m} dropped {g['drop']:.4f} > {g['tolerance']:g} vs {champion_name}")
    if reference == base_label and vs_base.challenger < vs_base.reference:
        reasons.append(f"the best model of this run is a baseline: {best} {metric} {vs_base.reference:.4f} "
                       f"vs challenger {vs_base.challenger:.4f}")
    floor = not (np.isfinite(vs_floor.ci_upper) and vs_floor.ci_upper < 0)
    extra = dict(best_baseline=best, vs_baseline=vs_base, vs_champion=vs_champ)
    if not floor:
        reasons.insert(0, f"{'force refused: ' if force else ''}significantly worse than {floor_best} (baseline) "
                          f"on {metric} (gain {vs_floor.gain:+.4f}, {vs_floor.confidence:.0%} upper bound "
                          f"{vs_floor.ci_upper:+.4f} < 0)")
        return Decision("rejected", False, reference, cmp, guards, reasons, both, **extra)
    if force:
        return Decision("forced", True, reference, cmp, guards,
                        reasons or ["would have passed the rule anyway"], both, **extra)
    if reasons:
        return Decision("rejected", False, reference, cmp, guards, reasons, both, **extra)
    return Decision("promoted", True, reference, cmp, guards,
                    [f"gain {cmp.gain:+.4f} vs {reference} >= {p.min_effect:g}, lower bound "
                     f"{cmp.ci_lower:+.4f} > 0" + (", guardrails ok" if guards else "")], both, **extra)


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
    b = d.vs_baseline
    if b is not None and d.reference != f"{d.best_baseline} (baseline)":
        text += (f" Best baseline of the run: {d.best_baseline} {b.reference:.4f} (gain {b.gain:+.4f}, "
                 f"bounds [{b.ci_lower:+.4f}, {b.ci_upper:+.4f}]).")
    if d.guardrails:
        text += " Guardrails: " + ", ".join(
            f"{m} {g['challenger']:.4f} vs {g['reference']:.4f} ({'ok' if g['ok'] else 'FAILED'})"
            for m, g in d.guardrails.items()) + "."
    if d.decision == "forced":
        text += f" Forced by {force_by or 'unknown'}: {force_reason or 'no reason given'}."
    text += " Reason: " + "; ".join(d.reasons) + "."
    return text
