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
                              "chosen_hyperparameters", "kinds": {name: strategy|baseline}, "seed"}
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

import pandas as pd

from genre_tasks.models import baselines as B
from genre_tasks import config, io, logs
from genre_tasks.models import views as D
from genre_tasks.evaluation import protocol as E
from genre_tasks import schema as S
from genre_tasks.errors import StageError


@dataclass(frozen=True)
class EvaluateParams:
    seed: int = 42
    baselines: tuple[str, ...] = ("random", "mostpop", "itemknn", "ease", "content")
    itemknn_k: tuple[int, ...] = (10, 20, 50, 100, 200)
    ease_lambda: tuple[float, ...] = (50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0)

    def validate(self) -> None:
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
        valid = ds.phase("valid")
        test_fit, test_ev = test = ds.phase("test")
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
        for d in dirs:
            rec = load_recommender(d)
            log.read(d, f"strategy {d.name} ({type(rec).__name__})")
            res = E.evaluate_recommender(rec, test_fit, test_ev, p.seed)
            res.name = d.name
            results.append(res)
            kinds[d.name] = "strategy"
            log.logger.info("%-14s test nDCG@10 %.4f (%.1fs)", d.name, res.metrics["ndcg@10"], res.seconds)
        if selected is not None and selected not in kinds:
            raise StageError(f"{selected_path}: selected strategy {selected!r} has no directory in {paths.model_dir}")

        # --- baselines ----------------------------------------------------------------------
        chosen: dict[str, dict] = {}
        tuning: dict[str, list[dict]] = {}
        for key in p.baselines:
            name = B.BASELINES[key].name
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

        # --- outputs ------------------------------------------------------------------------
        models = {r.name: r.metrics for r in results}
        table = comparison_table(models, selected)
        log.logger.info("model comparison (test, %s):\n%s", mode, table)
        report = {"split": mode, "selected": selected, "models": models, "chosen_hyperparameters": chosen,
                  "kinds": kinds, "seed": p.seed}
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
                "chosen_hyperparameters": chosen, "seconds": round(log.seconds, 2)}


def main(params: dict, paths: S.Paths) -> dict:
    return run(config.section(EvaluateParams, "evaluate", params), paths)
