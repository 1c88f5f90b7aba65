"""`evaluate` stage: the trained strategies and the baselines, same split, same metrics.

Reads the processed tables, the item vectors (+ filled genres) and ``data/model/``:

* cuts the ``valid`` phase (fit on train) and the ``test`` phase (fit on train + valid);
* each baseline in ``evaluate.baselines`` with a hyperparameter (ItemKNN ``k``, EASE
  ``lambda``) is tuned on valid (nDCG@10; cold nDCG@10 in the cold_items split), refitted on the
  test-phase fit data with the chosen value; every baseline is evaluated on test;
* every strategy directory in ``data/model/`` is loaded with
  ``genre_tasks.models.train.load_recommender`` (already fitted on the test-phase data) and evaluated
  on test; ``data/model/selected.json`` names the one that will be registered.

Writes
``metrics/evaluate.json``     {"split", "selected", "models": {name: metrics},
                              "chosen_hyperparameters", "kinds": {name: strategy|baseline}, "seed",
                              "best_baseline" (by test nDCG@10), "seeds": {strategy: mean ± sd
                              over its seed models (data/model/_seeds/)}, "paired": {strategy:
                              {baseline: {metric: {seed: diff, se, t, n}}}} (per-user paired
                              differences vs the best baseline and EASE), "parts": {strategy:
                              {"prior" | "personal": metrics}} (item-bias prior alone, the rest)}
``data/eval/comparison.md``   the comparison table (:func:`comparison_table`)
``data/eval/per_user.parquet`` model, group, user_idx, impression, one column per metric
                              (the per-unit values for paired tests; see EvalResult.frame)
``data/eval/tuning.json``     the validation grid of each tuned baseline
``data/eval/comparison.png``  bar charts with one-standard-error bars
``plots/comparison.csv``      model, metric means (DVC plots)
"""
from __future__ import annotations


import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from genre_tasks.models import baselines as B
from genre_tasks import config, io, logs
from genre_tasks.models import views as D
from genre_tasks.evaluation import protocol as E
from genre_tasks import schema as S
from genre_tasks.errors import StageError


#: baselines that are skipped above a catalogue size: key -> (EvaluateParams field, why)
ITEM_LIMITS: dict[str, tuple[str, str]] = {
    "ease": ("ease_max_items", "a dense items x items inverse"),
    "itemknn": ("itemknn_max_items", "an items x items co-occurrence, users' positives^2 in time"),
}


@dataclass(frozen=True)
class EvaluateParams:
    seed: int = 42
    baselines: tuple[str, ...] = ("random", "mostpop", "itemknn", "ease", "content")
    itemknn_k: tuple[int, ...] = (10, 20, 50, 100, 200)
    ease_lambda: tuple[float, ...] = (50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0)
    #: the EASE baseline only up to this many items (a dense [I, I] float64 inverse: ~3 x 8 I^2
    #: bytes and I^3 time; 10k items ~2.4 GB); above it, it is skipped with a log line and
    #: recorded under ``skipped_baselines`` in metrics/evaluate.json
    ease_max_items: int = 10_000
    #: the ItemKNN baseline only up to this many items: its co-occurrence costs the sum over users
    #: of positives^2 in time (1.5e10 at 168k items with heavy users: hours); skipped above, as EASE
    itemknn_max_items: int = 20_000
    #: evaluate (valid tuning and test) on a seeded sample of at most this many users; null = all.
    #: Scoring costs users x items; the sample size is recorded under ``eval_users``
    max_users: int | None = None

    def validate(self) -> None:
        if self.max_users is not None and self.max_users < 1:
            raise config.ParamsError(f"evaluate.max_users: must be >= 1 or null, got {self.max_users}")
        for key in ("ease_max_items", "itemknn_max_items"):
            if getattr(self, key) < 1:
                raise config.ParamsError(f"evaluate.{key}: must be >= 1, got {getattr(self, key)}")
        unknown = sorted(set(self.baselines) - set(B.BASELINES))
        if unknown:
            raise config.ParamsError(f"evaluate.baselines: unknown {unknown}; known: {sorted(B.BASELINES)}")
        if len(set(self.baselines)) != len(self.baselines):
            raise config.ParamsError(f"evaluate.baselines: duplicates in {list(self.baselines)}")
        if "itemknn" in self.baselines and (not self.itemknn_k or min(self.itemknn_k) < 1):
            raise config.ParamsError(f"evaluate.itemknn_k: need values >= 1, got {list(self.itemknn_k)}")
        if "ease" in self.baselines and (not self.ease_lambda or min(self.ease_lambda) <= 0):
            raise config.ParamsError(f"evaluate.ease_lambda: need values > 0, got {list(self.ease_lambda)}")


#: tuned baseline key -> (grid attribute of EvaluateParams, name reported in chosen_hyperparameters)
GRIDS: dict[str, tuple[str, str]] = {"itemknn": ("itemknn_k", "k"), "ease": ("ease_lambda", "lambda")}

#: comparison columns: (metric, header, show "± se")
MAIN_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("ndcg@10", "nDCG@10", True), ("recall@10", "Recall@10", False), ("recall@20", "Recall@20", False),
    ("mrr", "MRR", False), ("hr@10", "HR@10", False), ("auc", "AUC", False),
    ("imp_ndcg@10", "imp nDCG@10", False))
COLD_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("cold_ndcg@10", "cold nDCG@10", True), ("cold_recall@10", "cold Recall@10", False),
    ("cold_recall@20", "cold Recall@20", False), ("cold_mrr", "cold MRR", False))
COUNT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("n_users", "users"), ("n_impressions", "impressions"), ("n_cold_users", "cold users"))
PLOT_METRICS: tuple[str, ...] = ("ndcg@10", "recall@10", "recall@20", "mrr", "hr@10", "auc", "imp_ndcg@10",
                                 "cold_ndcg@10", "cold_recall@10", "cold_recall@20", "cold_mrr")


def _num(value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return v


def comparison_table(models: Mapping[str, Mapping[str, float]], selected: str | None = None,
                     digits: int = 4) -> str:
    """Markdown table of ``models`` ({name: metrics dict as in metrics/evaluate.json}).

    Rows in the given order (``selected`` marked); columns nDCG@10 ± se, Recall@10, Recall@20,
    MRR, HR@10, AUC, imp nDCG@10, the cold-item metrics when any model has them, and the unit
    counts. The best value of each metric column is in bold (all of them when tied at
    ``digits``); missing values show as "–".
    """
    has_cold = any(math.isfinite(_num(m.get("cold_ndcg@10"))) for m in models.values())
    columns = MAIN_COLUMNS + (COLD_COLUMNS if has_cold else ())
    counts = [(k, h) for k, h in COUNT_COLUMNS if any(k in m for m in models.values())
              and (k != "n_cold_users" or has_cold)]
    best = {}
    for key, _, _ in columns:
        vals = [round(_num(m.get(key)), digits) for m in models.values()]
        vals = [v for v in vals if math.isfinite(v)]
        best[key] = max(vals) if vals else None

    header = ["model", *(f"{h} ± se" if se else h for _, h, se in columns), *(h for _, h in counts)]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "---|" + "---:|" * (len(header) - 1)]
    for name, m in models.items():
        cells = [f"{name} (selected)" if name == selected else name]
        for key, _, se in columns:
            v = _num(m.get(key))
            if not math.isfinite(v):
                cells.append("–")
                continue
            text = f"{v:.{digits}f}"
            if best[key] is not None and round(v, digits) == best[key] and len(models) > 1:
                text = f"**{text}**"
            s = _num(m.get(f"{key}_se"))
            if se and math.isfinite(s):
                text += f" ± {s:.{digits}f}"
            cells.append(text)
        for key, _ in counts:
            v = m.get(key)
            cells.append(f"{int(v):,}" if v is not None and math.isfinite(_num(v)) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Best per column in **bold**; ± = one standard error of the per-user (per-impression) "
                 "mean. With a few hundred users, differences below two standard errors are noise.")
    return "\n".join(lines) + "\n"


def strategy_dirs(model_dir: Path) -> list[Path]:
    """Trained-strategy directories: the non-hidden sub-directories of ``data/model/``, sorted."""
    if not model_dir.is_dir():
        return []
    return sorted(d for d in model_dir.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))


def default_loader(model_dir: Path) -> D.Recommender:
    """``genre_tasks.models.train.load_recommender`` (imported lazily: it pulls in torch)."""
    try:
        train = importlib.import_module("genre_tasks.models.train")
    except ImportError as exc:
        raise StageError(f"{model_dir}: cannot import genre_tasks.models.train to load the model ({exc})") from exc
    return train.load_recommender(model_dir)


#: metrics summarised over seeds (mean ± sd) and compared per user with the baselines
SEED_METRICS: tuple[str, ...] = ("ndcg@10", "recall@10", "recall@20", "mrr", "hr@10", "auc", "imp_ndcg@10",
                                 "cold_ndcg@10", "cold_recall@10", "cold_recall@20", "cold_mrr")
PAIRED_METRICS: tuple[str, ...] = ("ndcg@10", "mrr", "auc", "cold_ndcg@10")
#: folder of the extra-seed models inside data/model (genre_tasks.models.train.SEEDS_DIR)
SEEDS_DIR = "_seeds"


def seed_dirs(model_dir: Path, strategy: str) -> list[tuple[int, Path]]:
    """(seed, folder) of ``strategy``'s extra-seed models: data/model/_seeds/<strategy>/<seed>/."""
    root = model_dir / SEEDS_DIR / strategy
    if not root.is_dir():
        return []
    return sorted((int(d.name), d) for d in root.iterdir() if d.is_dir() and d.name.lstrip("-").isdigit())


def paired_t(a: E.EvalResult, b: E.EvalResult, metric: str) -> dict:
    """Paired comparison of ``a`` - ``b`` on ``metric`` over the same units (users or
    impressions; both evaluated on the same EvalData, so the units are aligned): mean difference,
    its standard error, t = mean / se, and the number of units with both values finite."""
    import numpy as np

    if metric not in a.per_user or metric not in b.per_user:
        return {}
    ua, ub = a.users[metric], b.users[metric]
    if len(ua) != len(ub) or not np.array_equal(ua, ub):
        raise ValueError(f"paired_t: {a.name} and {b.name} were evaluated on different units")
    d = np.asarray(a.per_user[metric], np.float64) - np.asarray(b.per_user[metric], np.float64)
    d = d[np.isfinite(d)]
    n = len(d)
    if n < 2:
        return {"diff": float(d.mean()) if n else float("nan"), "se": float("nan"), "t": float("nan"), "n": n}
    se = float(d.std(ddof=1) / np.sqrt(n))
    mean = float(d.mean())
    return {"diff": mean, "se": se, "t": mean / se if se > 0 else float("nan"), "n": n}


def summarise_seeds(results: Mapping[int, E.EvalResult]) -> dict:
    """{metric: {"mean", "sd" (ddof 1; None with one seed), "values" (per seed, seed order)}}."""
    import numpy as np

    out = {}
    seeds = sorted(results)
    for m in SEED_METRICS:
        vals = [results[s].metrics.get(m) for s in seeds]
        if any(v is None for v in vals):
            continue
        arr = np.asarray(vals, np.float64)
        out[m] = {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if len(arr) > 1 else None,
                  "values": [float(v) for v in arr]}
    return {"seeds": seeds, "metrics": out}


class PartView:
    """One part of a recommender's score (``score(..., part=...)``: ``prior`` = the item-bias
    term alone, ``personal`` = the rest), evaluated like a model."""

    def __init__(self, rec, part: str, name: str) -> None:
        self.rec, self.part, self.name = rec, part, name

    def fit(self, data):
        return self

    def score(self, histories, data):
        return self.rec.score(histories, data, part=self.part)

    def scoring_session(self, data):
        return D.scoring_session(self.rec, data)


def has_parts(rec) -> bool:
    import inspect

    try:
        return "part" in inspect.signature(rec.score).parameters
    except (TypeError, ValueError):
        return False


def _finite_or_none(obj):
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def plot_comparison(models: Mapping[str, Mapping[str, float]], path: Path,
                    kinds: Mapping[str, str] | None = None) -> Path:
    """Horizontal bar charts (one panel per headline metric) with one-standard-error bars;
    trained strategies (``kinds[name] == "strategy"``) in orange, baselines in blue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in ("ndcg@10", "recall@20", "mrr", "auc", "cold_ndcg@10")
              if any(math.isfinite(_num(v.get(m))) for v in models.values())]
    names = list(models)
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.6 * max(len(panels), 1), 0.45 * len(names) + 1.6),
                             sharey=True, squeeze=False)
    for ax, metric in zip(axes[0], panels):
        vals = [_num(models[n].get(metric)) for n in names]
        errs = [_num(models[n].get(f"{metric}_se")) for n in names]
        vals = [v if math.isfinite(v) else 0.0 for v in vals]
        errs = [e if math.isfinite(e) else 0.0 for e in errs]
        colors = ["#dd8452" if (kinds or {}).get(n) == "strategy" else "#4c72b0" for n in names]
        ax.barh(range(len(names)), vals, xerr=errs, color=colors, ecolor="black", capsize=3)
        ax.set_title(metric)
        ax.set_yticks(range(len(names)), names)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].invert_yaxis()  # shared y axis: invert once, first model on top
    fig.suptitle("test split: mean ± 1 standard error")
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path


def run(p: EvaluateParams, paths: S.Paths,
        load_recommender: Callable[[Path], D.Recommender] | None = None) -> dict:
    load_recommender = load_recommender or default_loader
    with logs.stage("evaluate", paths) as log:
        for f in (paths.items, paths.interactions, paths.histories, paths.vectors):
            if not f.exists():
                raise StageError(f"{f}: missing; run the preprocess/embed stages first")
        mode = io.read_json(paths.split_info).get("mode", "unknown") if paths.split_info.exists() else "unknown"
        ds = D.Dataset.load(paths)
        log.read(paths.processed_dir, f"split {mode}: {len(ds.items):,} items, {len(ds.interactions):,} interactions")
        log.read(paths.vectors, f"item vectors {ds.vectors.shape}")
        for path in (paths.vector_index, paths.genre_predictions):
            if path.exists():
                log.read(path)
        valid_fit, valid_ev = ds.phase("valid")
        valid_ev, valid_sample = D.sample_users(valid_ev, p.max_users, p.seed)
        valid = (valid_fit, valid_ev)
        test_fit, test_ev = ds.phase("test")
        test_ev, test_sample = D.sample_users(test_ev, p.max_users, p.seed)
        test = (test_fit, test_ev)
        eval_users = {"max_users": p.max_users, "valid": valid_sample, "test": test_sample}
        if test_sample["sampled"]:
            log.logger.warning("evaluating a SAMPLE of users (evaluate.max_users=%d, seed %d): test %d of %d, "
                               "valid %d of %d", p.max_users, p.seed, test_sample["users"],
                               test_sample["users_total"], valid_sample["users"], valid_sample["users_total"])
        log.logger.info("test phase: %d users, %d impressions%s", len(test_ev.users), len(test_ev.impressions),
                        f", {len(test_ev.cold_users)} cold users on {len(test_ev.cold_items)} cold items"
                        if test_ev.cold_items is not None else "")

        results: list[E.EvalResult] = []
        kinds: dict[str, str] = {}
        # --- trained strategies -------------------------------------------------------------
        selected = None
        selected_path = paths.model_dir / "selected.json"
        if selected_path.exists():
            selected = io.read_json(selected_path).get("strategy")
            log.read(selected_path, f"selected strategy {selected}")
        dirs = strategy_dirs(paths.model_dir)
        if not dirs:
            log.logger.warning("no trained strategies in %s: evaluating the baselines only", paths.model_dir)
        by_seed: dict[str, dict[int, E.EvalResult]] = {}
        parts: dict[str, dict[str, dict]] = {}
        for d in dirs:
            rec = load_recommender(d)
            log.read(d, f"strategy {d.name} ({type(rec).__name__})")
            res = E.evaluate_recommender(rec, test_fit, test_ev, p.seed)
            res.name = d.name
            results.append(res)
            kinds[d.name] = "strategy"
            log.logger.info("%-14s test nDCG@10 %.4f (%.1fs)", d.name, res.metrics["ndcg@10"], res.seconds)
            seed = (getattr(rec, "meta", None) or {}).get("seed")
            extra = seed_dirs(paths.model_dir, d.name)
            if seed is not None and extra:
                by_seed[d.name] = {int(seed): res}
                for s, sd in extra:
                    r = E.evaluate_recommender(load_recommender(sd), test_fit, test_ev, p.seed)
                    r.name = f"{d.name}@{s}"
                    by_seed[d.name][s] = r
                    log.logger.info("%-14s test nDCG@10 %.4f (%.1fs)", r.name, r.metrics["ndcg@10"], r.seconds)
            if has_parts(rec):
                parts[d.name] = {}
                for part in ("prior", "personal"):
                    r = E.evaluate_recommender(PartView(rec, part, f"{d.name} {part}"), test_fit, test_ev, p.seed)
                    parts[d.name][part] = r.metrics
        if selected is not None and selected not in kinds:
            raise StageError(f"{selected_path}: selected strategy {selected!r} has no directory in {paths.model_dir}")

        # --- baselines ----------------------------------------------------------------------
        chosen: dict[str, dict] = {}
        tuning: dict[str, list[dict]] = {}
        skipped: dict[str, str] = {}
        for key in p.baselines:
            name = B.BASELINES[key].name
            limit = ITEM_LIMITS.get(key)
            if limit is not None and len(ds.items) > getattr(p, limit[0]):
                skipped[name] = (f"{len(ds.items):,} items > evaluate.{limit[0]}={getattr(p, limit[0]):,} "
                                 f"({limit[1]})")
                log.logger.warning("%-14s SKIPPED: %s", name, skipped[name])
                continue
            if name in kinds:
                raise StageError(f"baseline name {name!r} collides with a strategy directory in {paths.model_dir}")
            if key in GRIDS:
                grid_attr, label = GRIDS[key]
                arg = B.TUNED[key]

                def make(value, key=key, arg=arg):
                    return B.make_baseline(key, p.seed, **{arg: value})

                best, table = E.tune(make, getattr(p, grid_attr), valid, seed=p.seed)
                row = next(r for r in table if r["value"] == best)
                chosen[name] = {label: best, f"valid_{row['metric']}": row["score"]}
                tuning[name] = [{label: r["value"], **{k: v for k, v in r.items() if k not in ("value", "seconds")}}
                                for r in table]
                log.logger.info("%-14s tuned %s=%s on valid (%s %.4f; grid %s)", name, label, best, row["metric"],
                                row["score"], ", ".join(f"{r['value']}: {r['score']:.4f}" for r in table))
                rec = E.fit_for_test(make, best, test)
            else:
                rec = B.make_baseline(key, p.seed).fit(test_fit)
            res = E.evaluate_recommender(rec, test_fit, test_ev, p.seed)
            results.append(res)
            kinds[res.name] = "baseline"
            log.logger.info("%-14s test nDCG@10 %.4f (%.1fs)", res.name, res.metrics["ndcg@10"], res.seconds)

        # --- seeds and paired tests against the baselines ------------------------------------
        baseline_results = {r.name: r for r in results if kinds.get(r.name) == "baseline"}
        best_baseline = (max(baseline_results, key=lambda n: baseline_results[n].metrics["ndcg@10"])
                         if baseline_results else None)
        references = [n for n in dict.fromkeys([best_baseline, "EASE"]) if n in baseline_results]
        paired: dict[str, dict] = {}
        for res in results:
            if kinds.get(res.name) != "strategy":
                continue
            runs = by_seed.get(res.name) or {0: res}
            paired[res.name] = {
                ref: {m: {str(s): paired_t(r, baseline_results[ref], m) for s, r in sorted(runs.items())}
                      for m in PAIRED_METRICS if m in res.per_user}
                for ref in references}
        seeds_report = {name: summarise_seeds(runs) for name, runs in by_seed.items()}

        # --- outputs ------------------------------------------------------------------------
        models = {r.name: r.metrics for r in results}
        table = comparison_table(models, selected)
        log.logger.info("model comparison (test, %s):\n%s", mode, table)
        report = {"split": mode, "selected": selected, "models": models, "chosen_hyperparameters": chosen,
                  "kinds": kinds, "seed": p.seed, "best_baseline": best_baseline, "seeds": seeds_report,
                  "paired": paired, "parts": parts, "skipped_baselines": skipped,
                  "eval_users": eval_users}
        io.write_json(_finite_or_none(report), paths.metrics("evaluate"))
        log.wrote(paths.metrics("evaluate"))

        eval_dir = paths.root / "data" / "eval"
        with io.atomic_dir(eval_dir) as tmp:
            tuned = ", ".join(f"{n} {k}={v}" for n, c in chosen.items() for k, v in c.items() if not k.startswith("valid_"))
            (tmp / "comparison.md").write_text(
                f"{table}\nSplit `{mode}`, test phase (models fitted on train + valid); tie-break seed {p.seed}"
                + (f"; tuned on valid: {tuned}" if tuned else "") + ".\n")
            per_user = pd.concat([r.frame() for r in results], ignore_index=True)
            per_user.to_parquet(tmp / "per_user.parquet", index=False)
            io.write_json(_finite_or_none({"metric": E.selection_metric(valid[1]), "grids": tuning,
                                           "chosen": chosen}), tmp / "tuning.json")
            plot_comparison(models, tmp / "comparison.png", kinds)
        for name in ("comparison.md", "per_user.parquet", "tuning.json", "comparison.png"):
            log.wrote(eval_dir / name)

        cols = [m for m in PLOT_METRICS if any(m in r.metrics for r in results)]
        csv = pd.DataFrame([{"model": r.name, **{m: round(r.metrics[m], 6) for m in cols if m in r.metrics}}
                            for r in results])
        with io.atomic_path(paths.plots_dir / "comparison.csv") as tmp:
            csv.to_csv(tmp, index=False)
        log.wrote(paths.plots_dir / "comparison.csv")

        return {"split": mode, "selected": selected, "n_users": test_ev.users.size,
                "n_impressions": len(test_ev.impressions),
                "ndcg@10": {r.name: round(r.metrics["ndcg@10"], 4) for r in results},
                "chosen_hyperparameters": chosen, "skipped_baselines": skipped,
                "eval_users": eval_users, "seconds": round(log.seconds, 2)}


def main(params: dict, paths: S.Paths) -> dict:
    return run(config.section(EvaluateParams, "evaluate", params), paths)
