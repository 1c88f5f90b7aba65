"""train stage: fit the strategies of ``train.strategies`` (two-tower, EASE, fusion), pick the best.

For each two-tower strategy (genre_tasks.models.model) and each seed of ``train.seed`` +
``train.extra_seeds``:

1. fit on the ``valid`` phase (FitData = train split) with early stopping on validation
   nDCG@10 (full ranking, seen items excluded; in the cold_items split: ranking only the cold
   validation items for the users with cold targets), ``patience`` epochs without improvement;
   the run ends on its best epoch's weights;
2. re-fit from scratch, same seed, on the ``test`` phase (train + valid) for the best epoch
   count (``train.refit``; false reuses the early-stopping model), and save that model (the one
   evaluate / promote / serving use).

``ease`` picks lambda on valid and refits in closed form; ``fusion`` (genre_tasks.models.fusion)
blends the ease and tower models with weights chosen on valid (:func:`fusion_grid`,
:func:`choose_blend`). The selected strategy is the best **mean over seeds** of the validation
metric (:func:`select`): a model-selection choice made on the validation split only.
``train.mode: warm`` retrains only the strategy of ``train.warm_from`` from its weights, with its
EASE lambda (:func:`warm_plan`).

Outputs (``data/model`` is written as a whole, atomically):

``data/model/<strategy>/model.pt``   state_dict of genre_tasks.models.tower.TwoTower
``data/model/<strategy>/meta.json``  params, strategy, item_ids (id-table order), genre_names,
                                     vec_dim, dim, hidden, best_epoch, fit_phase "test",
                                     history (per epoch: train_loss, valid_ndcg@10); no
                                     timings, so two runs write byte-identical files
``data/model/<strategy>/curve.csv``  epoch, train_loss, valid_ndcg@10
``data/model/_seeds/<strategy>/<seed>/``  the extra-seed models (evaluate's mean ± sd over seeds)
``data/model/selected.json``         {"strategy", "selection_metric", "rule", "valid_ndcg@10":
                                     {strategy: mean over seeds}}
``data/model/train_curve.png``       validation nDCG@10 per epoch, one line per strategy
``metrics/train.json``               per strategy: best_epoch, valid_ndcg@10, seconds_per_epoch,
                                     seconds, peak_rss_mb (of the process so far), examples;
                                     plus selected
``plots/train_curve.csv``            strategy, epoch, train_loss, valid_ndcg@10

Determinism: ``torch.manual_seed(seed)``, a seeded numpy Generator for batches and negatives,
``torch.use_deterministic_algorithms(True)`` and ``torch.set_num_threads(threads)`` (restored
afterwards): two runs with the same inputs give bit-identical models and metrics on CPU.

torch is imported inside functions only, so importing this module is cheap.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from genre_tasks import config, io, logs
from genre_tasks.registry import stage_logging, tracking_store
from genre_tasks import schema as S
from genre_tasks.models.determinism import passive_openmp
from genre_tasks.models.params import (  # noqa: F401  (STRATEGIES, TWO_TOWER: also for train's readers)
    METRIC, STRATEGIES, TWO_TOWER, TrainParams)
from genre_tasks.models.validation import eval_users, validation_ndcg
from genre_tasks.models.views import Dataset, EvalData, FitData, sample_users

if TYPE_CHECKING:
    from genre_tasks.models.model import FitResult

#: extra-seed models (for selection and the mean ± sd report): data/model/_seeds/<strategy>/<seed>/
SEEDS_DIR = "_seeds"


def load_recommender(model_dir: str | Path):
    """The recommender saved under ``model_dir``: a FusionRecommender (genre_tasks.models.fusion),
    an EaseRecommender (genre_tasks.models.linear) or a TorchRecommender (genre_tasks.models.model)."""
    from genre_tasks.models import fusion, linear

    if fusion.is_saved(model_dir):
        return fusion.load(model_dir)
    if linear.is_saved(model_dir):
        return linear.load(model_dir)
    from genre_tasks.models.model import load_recommender as _load

    return _load(model_dir)


def _rank_ndcg(scores: np.ndarray, fit: FitData, users: np.ndarray, targets: list,
               candidates: np.ndarray | None, seed: int) -> float:
    from genre_tasks.evaluation import metrics

    if users is None or len(users) == 0:
        return float("nan")
    tie = metrics.tie_order(fit.n_items, seed)
    res = metrics.ranking_metrics(scores, targets, tie=tie, exclude=fit.seen.tocsr()[users], candidates=candidates)
    return float(np.mean(res[METRIC]))


def fusion_grid(ease_rec, tower_rec, grid: Sequence[tuple[float, float]], fit: FitData, ev: EvalData,
                seed: int, quality: np.ndarray | None = None) -> list[tuple[float, float, float]]:
    """Per (w, v) of ``grid``: (selection metric, full-ranking nDCG@10, impression AUC) on ``ev``
    of the blend ``(1 - w) z(ease) + w z(tower) + v z(quality)``; the models' scores are
    computed once.

    The selection metric is cold nDCG@10 in the cold_items split (ranking the cold validation
    items: the same for every w > 0, neither EASE nor the quality prior can tell cold items
    apart), else nDCG@10; the full-ranking nDCG@10 breaks ties (so on cold items the weights are
    chosen by how well the blend ranks the warm catalogue)."""
    from genre_tasks.evaluation import metrics
    from genre_tasks.models.fusion import standardise

    sel_users, sel_targets, candidates = eval_users(ev)
    imp_users = np.asarray([u for u, _, _ in ev.impressions], np.int64)
    users = np.unique(np.concatenate([np.asarray(ev.users, np.int64), imp_users,
                                      np.asarray(sel_users if sel_users is not None else [], np.int64)]))
    hist = [fit.histories[u] for u in users]
    ze = standardise(ease_rec.score(hist, fit))
    zt = standardise(tower_rec.score(hist, fit))
    zq = standardise(np.asarray(quality, np.float64)[None, :])[0] if quality is not None else np.zeros(fit.n_items)
    rows_full = np.searchsorted(users, ev.users)
    rows_sel = np.searchsorted(users, sel_users) if sel_users is not None else None
    rows_imp = np.searchsorted(users, imp_users)
    tie = metrics.tie_keys(seed, users, np.arange(fit.n_items))

    def point(wv: tuple[float, float]) -> tuple[float, float, float]:
        w, v = wv
        blend = (1.0 - w) * ze + w * zt + v * zq[None, :]
        full = _rank_ndcg(blend[rows_full], fit, ev.users, ev.targets, None, seed)
        sel = full if candidates is None else _rank_ndcg(blend[rows_sel], fit, sel_users, sel_targets,
                                                         candidates, seed)
        if len(imp_users):
            imp = metrics.impression_metrics([blend[r, it] for r, (_, it, _) in zip(rows_imp, ev.impressions)],
                                             [lab for _, _, lab in ev.impressions],
                                             [tie[r, it] for r, (_, it, _) in zip(rows_imp, ev.impressions)])
            auc = float(np.nanmean(imp["auc"]))
        else:
            auc = float("nan")
        return sel, full, auc

    # numpy's comparisons and reductions run on one core and release the GIL: the grid's points
    # (independent, each result its own) are evaluated by as many threads as torch may use
    workers = max(1, min(len(grid), _threads()))
    if workers == 1:
        return [point(wv) for wv in grid]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="fusion-grid") as pool:
        return list(pool.map(point, grid))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def choose_blend(grid: Sequence[tuple[float, float]], means: Sequence[tuple[float, float, float]],
                 ease_auc: float, tolerance: float) -> int:
    """Index of the chosen (w, v): the best mean selection metric (ties: full-ranking nDCG@10,
    then the earlier grid point) among the points whose mean valid AUC is at least EASE's minus
    ``tolerance``; EASE itself (w = 0, v = 0) always qualifies. Without impressions (NaN AUC)
    the constraint is not applied."""
    ok = [i for i, m in enumerate(means)
          if not math.isfinite(ease_auc) or not math.isfinite(m[2]) or m[2] >= ease_auc - tolerance - 1e-12]
    ok = ok or [i for i, (w, v) in enumerate(grid) if w == 0 and v == 0] or list(range(len(grid)))
    return max(ok, key=lambda i: (round(means[i][0], 6), round(means[i][1], 6), -i))


def full_ndcg(rec, fit: FitData, ev: EvalData, seed: int) -> float:
    """Full-ranking validation nDCG@10 (= :func:`validation_ndcg` outside the cold_items split)."""
    if ev.cold_items is None:
        return validation_ndcg(rec, fit, ev, seed)
    scores = rec.score([fit.histories[u] for u in ev.users], fit)
    return _rank_ndcg(scores, fit, ev.users, ev.targets, None, seed)


def fit_ease_strategy(p: TrainParams, fit_v: FitData, ev_v: EvalData, fit_t: FitData,
                      live: Callable[..., None] | None = None) -> tuple[Any, list[dict], float, int, Any]:
    """``ease``: lambda chosen on valid (fit on train) from ``p.ease_lambda``, refit on the
    test-phase data. Returns (recommender, curve rows (one per grid value), best valid nDCG@10,
    index of the best value, 1-based, the valid-phase model of that value). ``live(step, loss,
    seconds, ndcg)`` is called after each grid value (step = its 1-based index), like
    fit_model's per-epoch callback."""
    from genre_tasks.models import linear

    curve, best, best_i, best_rec = [], -math.inf, 1, None
    for i, lam in enumerate(p.ease_lambda, 1):
        t0 = time.perf_counter()
        rec_v = linear.fit_ease(fit_v, lam)
        ndcg = validation_ndcg(rec_v, fit_v, ev_v, p.seed)
        curve.append({"epoch": i, "train_loss": None, "valid_ndcg@10": ndcg,
                      "seconds": time.perf_counter() - t0, "lambda": lam})
        if live is not None:
            live(i, None, curve[-1]["seconds"], ndcg)
        if ndcg > best:
            best, best_i, best_rec = ndcg, i, rec_v
    rec = linear.fit_ease(fit_t, p.ease_lambda[best_i - 1])
    rec.meta["valid_grid"] = [{"lambda": c["lambda"], "valid_ndcg@10": c["valid_ndcg@10"]} for c in curve]
    return rec, curve, best, best_i, best_rec


def search(p: TrainParams, strategy: str, fit_v: FitData, ev_v: EvalData,
           log: logging.Logger) -> tuple[TrainParams, dict, FitResult]:
    """The budgeted hyper-parameter search of ``train.search_trials`` for one two-tower strategy.

    Trial 0 is the current values; the others are drawn without replacement (seeded by
    ``p.seed``) from the grid ``p.search_space``. Each trial fits on the valid phase with early
    stopping (seed ``p.seed``); the best valid metric wins (ties: the earlier trial, so the
    current values unless beaten). Returns (params with the winner's values, record, the winning
    trial's fit: it is the first seed's valid-phase fit, which :func:`fit_tower` then reuses)."""
    import itertools

    from genre_tasks.models.model import fit_model

    names = sorted(p.search_space)
    current = {n: getattr(p, n) for n in names}
    grid = [dict(zip(names, combo)) for combo in itertools.product(*(p.search_space[n] for n in names))]
    others = [g for g in grid if p.with_values(g).as_dict() != p.as_dict()]
    rng = np.random.default_rng(p.seed)
    n = min(p.search_trials - 1, len(others))
    picks = [current] + [others[int(i)] for i in sorted(rng.choice(len(others), size=n, replace=False))]
    trials, fits = [], []
    for i, values in enumerate(picks):
        q = p.with_values(values)
        t0 = time.perf_counter()
        res = fit_model(q, strategy, fit_v, ev_v, show_progress=False)
        trials.append({"trial": i, "values": {k: getattr(q, k) for k in names},
                       "valid_ndcg@10": _finite(res.best_ndcg), "best_epoch": res.best_epoch,
                       "epochs_run": len(res.curve), "seconds": round(time.perf_counter() - t0, 2)})
        fits.append(res)
        log.info("%s search trial %d/%d %s: valid %.4f (best epoch %d)", strategy, i + 1, len(picks),
                 trials[-1]["values"], res.best_ndcg, res.best_epoch)
    scores = [t["valid_ndcg@10"] if t["valid_ndcg@10"] is not None else -math.inf for t in trials]
    best = int(np.argmax(scores))  # first maximum: the earlier trial on ties
    log.info("%s search: trial %d chosen %s (grid of %d, %d tried)", strategy, best, trials[best]["values"],
             len(grid), len(trials))
    return p.with_values(picks[best]), {"chosen": best, "grid_size": len(grid), "trials": trials}, fits[best]


def fit_tower(p: TrainParams, strategy: str, fit_v: FitData, ev_v: EvalData, fit_t: FitData,
              selection_metric: str, live=None, live_refit=None, init=None,
              valid_fit: FitResult | None = None) -> tuple[Any, Any, dict, FitResult]:
    """One two-tower strategy, one seed (``p.seed``): early stopping on valid, then the test-phase
    model (refit on train + valid for the best epoch count, or the early-stopping run's model
    when ``p.refit`` is false). ``init``: warm start both fits from this model's weights.
    ``valid_fit``: the early-stopping fit already made with exactly these params (the search's
    winning trial), reused instead of fitted again. Returns (test-phase model, valid-phase model, record, FitResult)."""
    from genre_tasks.models.model import fit_and_refit, fit_model, side_by_side, untimed

    final = None
    if valid_fit is None and side_by_side(p, strategy, warm=init is not None):
        res, final = fit_and_refit(p, strategy, fit_v, ev_v, fit_t, live=live, live_refit=live_refit, init=init)
    else:
        res = valid_fit if valid_fit is not None else fit_model(p, strategy, fit_v, ev_v, live=live, init=init)
    valid_rec = res.recommender
    if p.refit:
        if final is None:
            final = fit_model(p, strategy, fit_t, None, epochs=res.best_epoch, show_progress=True,
                              live=live_refit, init=init)
        rec = final.recommender
        refit_curve, examples_test = final.curve, final.n_examples
    else:
        import copy

        rec = copy.copy(valid_rec)  # same weights; its own meta
        rec.meta = dict(valid_rec.meta)
        refit_curve, examples_test = [], None
    # no timings in data/model: two runs must write byte-identical files
    rec.meta.update({"best_epoch": res.best_epoch, "fit_phase": "test" if p.refit else "valid",
                     "history": untimed(res.curve), "valid_ndcg@10": _finite(res.best_ndcg),
                     "selection_metric": selection_metric, "refit_history": untimed(refit_curve),
                     "seed": p.seed})
    per_epoch = [c["seconds"] for c in res.curve + refit_curve]
    record = {"best_epoch": res.best_epoch, "valid_ndcg@10": _finite(res.best_ndcg),
              "epochs_run": len(res.curve), "epochs_refit": len(refit_curve),
              "seconds_per_epoch": round(float(np.median(per_epoch)), 3) if per_epoch else None,
              "examples_valid": res.n_examples, "examples_test": examples_test}
    return rec, valid_rec, record, res


# --- outputs ---------------------------------------------------------------------------------

def _plot(curves: pd.DataFrame, path: Path, metric_label: str, column: str = "valid_ndcg@10",
          title: str = "train: validation nDCG@10 per epoch") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for strategy, g in curves.groupby("strategy", sort=False):
        ax.plot(g["epoch"], pd.to_numeric(g[column], errors="coerce"), marker="o", label=strategy)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # an EASE-only warm retrain has no epochs
        ax.legend()
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def load_warm_source(spec: str, paths: S.Paths):
    """The recommender a warm start begins from (``train.warm_from``), or None if there is none
    (no such folder, no such registered model/alias)."""
    if spec.startswith("models:/"):
        try:
            from genre_tasks.registry import serving

            tracking_store.configure(paths)
            return serving.load(spec).recommender
        except Exception as exc:  # no registry / no champion yet: the caller trains in full
            logging.getLogger("genre.train").warning("warm start: %s not loadable (%s)", spec, exc)
            return None
    folder = Path(spec) if Path(spec).is_absolute() else paths.root / spec
    return load_recommender(folder) if folder.is_dir() else None


def warm_plan(rec) -> tuple[tuple[str, ...], Any]:
    """(strategies to retrain, the two-tower model to start from or None) for a warm start of
    ``rec``: a fusion model retrains its tower, ease and the blend; a two-tower model itself;
    EASE (closed form) is simply refitted."""
    from genre_tasks.models import fusion, linear

    if isinstance(rec, fusion.FusionRecommender):
        return (rec.tower.strategy, "ease", "fusion"), rec.tower
    if isinstance(rec, linear.EaseRecommender):
        return ("ease",), None
    return (rec.strategy,), rec


def select(p: TrainParams, valid: dict[str, dict[int, tuple[float, float]]]) -> tuple[str, dict]:
    """The selected strategy: the best mean over seeds of the validation selection metric, ties
    (at 6 decimals) broken by the mean full-ranking nDCG@10, then by the order of
    ``p.strategies``. ``valid[strategy][seed] = (selection metric, full nDCG@10)``.

    Averaging over seeds (rather than taking one seed's number) is the robust rule: one seed's
    validation score moves by about as much as the differences between strategies."""
    means = {}
    for strategy in p.strategies:
        vals = list(valid.get(strategy, {}).values())
        sel = [v[0] for v in vals if v[0] is not None and math.isfinite(v[0])]
        full = [v[1] for v in vals if v[1] is not None and math.isfinite(v[1])]
        means[strategy] = (float(np.mean(sel)) if sel else None, float(np.mean(full)) if full else None)
    ranked = [s for s in p.strategies if means[s][0] is not None]
    if not ranked:
        return p.strategies[0], means
    best = max(ranked, key=lambda s: (round(means[s][0], 6), round(means[s][1] or -1.0, 6),
                                      -p.strategies.index(s)))
    return best, means


def fit_all(p: TrainParams, ds: Dataset, paths: S.Paths, logger: logging.Logger, warm_tower: Any = None,
            warm_from: str | None = None) -> tuple[dict, dict, list[dict], dict]:
    """Every strategy of ``p.strategies`` and every seed: early stopping on valid, refit, the
    fusion blend chosen on valid, the selection (:func:`select`). With ``warm_tower`` (a warm start
    with ``train.warm_revalidate``) the towers start from its weights. Returns (strategy -> seed ->
    test-phase model, per-strategy record, curve rows, the selected.json record)."""
    from genre_tasks.models import fusion

    fit_v, ev_v = ds.phase("valid")
    ev_v, valid_sample = sample_users(ev_v, p.valid_max_users, p.seed)
    if valid_sample["sampled"]:
        logger.warning("validating on a SAMPLE of users (train.valid_max_users=%d, seed %d): %d of %d",
                       p.valid_max_users, p.seed, valid_sample["users"], valid_sample["users_total"])
    fit_t, _ = ds.phase("test")
    cold = ev_v.cold_items is not None
    selection_metric = "cold_ndcg@10" if cold else "ndcg@10"
    users = eval_users(ev_v)[0]
    logger.info("valid phase: %d users, %d items, %d fit positives; early stopping on %s "
                "over %d users; seeds %s", fit_v.n_users, fit_v.n_items, int(fit_v.positives.nnz),
                selection_metric, 0 if users is None else len(users), list(p.seeds))

    results: dict[str, dict] = {}
    finals: dict[str, dict[int, Any]] = {}  # strategy -> seed -> test-phase model
    valid_models: dict[str, dict[int, Any]] = {}  # strategy -> seed -> valid-phase model
    valid: dict[str, dict[int, tuple[float, float]]] = {}  # strategy -> seed -> (sel, full)
    curves = []
    for strategy in p.strategies:
        t0 = time.perf_counter()
        if strategy == "ease":
            rec, curve, best_ndcg, best_i, rec_v = fit_ease_strategy(
                p, fit_v, ev_v, fit_t, live=stage_logging.epoch_logger(strategy, paths))
            logger.info("ease: lambda %s chosen on valid (%s %.4f; grid %s)", rec.lam, selection_metric,
                        best_ndcg, ", ".join(f"{c['lambda']:g}: {c['valid_ndcg@10']:.4f}" for c in curve))
            rec.meta.update({"valid_ndcg@10": _finite(best_ndcg), "selection_metric": selection_metric})
            finals[strategy] = {p.seed: rec}
            valid_models[strategy] = {p.seed: rec_v}
            valid[strategy] = {p.seed: (best_ndcg, full_ndcg(rec_v, fit_v, ev_v, p.seed))}
            results[strategy] = {"best_epoch": best_i, "valid_ndcg@10": _finite(best_ndcg),
                                 "lambda": rec.lam, "epochs_run": len(curve)}
            curves += [{"strategy": strategy, "epoch": c["epoch"], "train_loss": c["train_loss"],
                        "valid_ndcg@10": c["valid_ndcg@10"], "seconds": c["seconds"]} for c in curve]
        elif strategy == "fusion":
            ease_v, ease_t = valid_models["ease"][p.seed], finals["ease"][p.seed]
            tower = p.fusion_tower
            grid = [(float(w), float(v)) for w in p.fusion_weights for v in p.fusion_prior_weights]
            if (0.0, 0.0) not in grid:
                grid.append((0.0, 0.0))  # EASE itself: the AUC reference
            q_valid = fusion.quality_prior(fit_v)[0]
            grids = {seed: fusion_grid(ease_v, valid_models[tower][seed], grid, fit_v, ev_v, p.seed, q_valid)
                     for seed in p.seeds}
            means = [tuple(float(np.mean([grids[sd][i][k] for sd in p.seeds])) for k in range(3))
                     for i in range(len(grid))]
            ease_auc = means[grid.index((0.0, 0.0))][2]
            best_i = choose_blend(grid, means, ease_auc, p.fusion_auc_tolerance)
            w, v = grid[best_i]
            logger.info("fusion: tower weight %s, quality-prior weight %s chosen on valid (mean over seeds "
                        "%s %.4f, AUC %.4f vs EASE %.4f - tolerance %s; grid %s)", w, v, selection_metric,
                        means[best_i][0], means[best_i][2], ease_auc, p.fusion_auc_tolerance,
                        ", ".join(f"{a:g}/{b:g}: {m[0]:.4f}|{m[2]:.3f}" for (a, b), m in zip(grid, means)))
            grid_meta = [{"weight": a, "prior_weight": b, "valid_" + selection_metric: _finite(m[0]),
                          "valid_ndcg@10_full": _finite(m[1]), "valid_auc": _finite(m[2])}
                         for (a, b), m in zip(grid, means)]
            q_test, q_unknown = fusion.quality_prior(fit_t)
            quality = ([str(i) for i in fit_t.item_ids], q_test, q_unknown)
            finals[strategy] = {}
            valid[strategy] = {}
            for seed in p.seeds:
                meta = {"valid_grid": grid_meta, "valid_ndcg@10": _finite(grids[seed][best_i][0]),
                        "valid_auc": _finite(grids[seed][best_i][2]), "valid_auc_ease": _finite(ease_auc),
                        "selection_metric": selection_metric, "seed": seed, "fit_phase": "test"}
                finals[strategy][seed] = fusion.FusionRecommender(ease_t, finals[tower][seed], w, meta, v, quality)
                valid[strategy][seed] = grids[seed][best_i][:2]
            results[strategy] = {"weight": w, "prior_weight": v, "tower": tower, "lambda": ease_t.lam,
                                 "valid_ndcg@10": _finite(grids[p.seed][best_i][0]),
                                 "valid_auc": _finite(means[best_i][2]), "valid_auc_ease": _finite(ease_auc)}
            curves += [{"strategy": strategy, "epoch": i + 1, "train_loss": None, "valid_ndcg@10": m[0],
                        "seconds": None} for i, m in enumerate(means)]
        else:
            finals[strategy], valid_models[strategy], valid[strategy] = {}, {}, {}
            records = {}
            p_strategy, searched, searched_fit = p, None, None
            if p.search_trials > 0 and warm_from is None:
                p_strategy, searched, searched_fit = search(p, strategy, fit_v, ev_v, logger)
            for seed in p.seeds:
                ps = dataclasses.replace(p_strategy, seed=seed)
                main_seed = seed == p.seed
                rec, rec_v, record, res = fit_tower(
                    ps, strategy, fit_v, ev_v, fit_t, selection_metric,
                    live=stage_logging.epoch_logger(strategy, paths) if main_seed else None,
                    live_refit=stage_logging.epoch_logger(strategy, paths, phase="refit") if main_seed else None,
                    init=warm_tower if warm_tower is not None and warm_tower.strategy == strategy else None,
                    valid_fit=searched_fit if main_seed else None)
                if warm_from is not None:
                    rec.meta["warm_from"] = warm_from
                logger.info("%s seed %d: best epoch %d, valid %s %.4f (%d epochs run, %d refit)", strategy,
                            seed, res.best_epoch, selection_metric, res.best_ndcg, len(res.curve),
                            record["epochs_refit"])
                finals[strategy][seed], valid_models[strategy][seed] = rec, rec_v
                valid[strategy][seed] = (res.best_ndcg, full_ndcg(rec_v, fit_v, ev_v, p.seed) if cold
                                         else res.best_ndcg)
                records[seed] = record
                if main_seed:
                    curves += [{"strategy": strategy, "epoch": c["epoch"], "train_loss": c["train_loss"],
                                "valid_ndcg@10": c["valid_ndcg@10"], "seconds": c["seconds"]} for c in res.curve]
            results[strategy] = dict(records[p.seed])
            if searched is not None:
                results[strategy]["search"] = searched
            if p.extra_seeds:
                results[strategy]["per_seed"] = {str(sd): {k: r[k] for k in ("best_epoch", "valid_ndcg@10",
                                                                               "epochs_run")}
                                                 for sd, r in records.items()}
        vals = [v[0] for v in valid[strategy].values() if v[0] is not None and math.isfinite(v[0])]
        results[strategy].update({
            "valid_mean": _finite(float(np.mean(vals))) if vals else None,
            "valid_sd": _finite(float(np.std(vals, ddof=1))) if len(vals) > 1 else None,
            "seeds": sorted(valid[strategy]),
            "seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(logs.peak_rss_mb(), 1)})

    best, means = select(p, valid)
    scores = {s: _finite(means[s][0]) if means[s][0] is not None else None for s in p.strategies}
    selected = {"strategy": best, "selection_metric": selection_metric,
                "rule": f"best mean over seeds {list(p.seeds)} of valid {selection_metric}"
                        + ("; ties by full-ranking valid nDCG@10" if cold else ""),
                "valid_ndcg@10": scores, "valid_users": valid_sample}
    return finals, results, curves, selected


def fit_warm(p: TrainParams, source: Any, ds: Dataset, paths: S.Paths,
             logger: logging.Logger) -> tuple[dict, dict, list[dict], dict]:
    """A warm retrain that keeps what the champion's full run validated (``train.warm_revalidate``
    false): its strategy, EASE lambda and fusion weights. The tower is fine-tuned from the
    champion's weights on the test-phase data (train + valid) for ``p.warm_epochs`` epochs, EASE is
    refitted in closed form, the fusion quality prior recomputed; nothing is chosen on valid (the
    champion was fitted on the previous data's valid targets: a valid score of its fine-tuned
    weights would be optimistic, and the weekly full run re-selects everything). The gate then
    judges the result on test against the champion. Returns what :func:`fit_all` returns."""
    from genre_tasks.models import fusion, linear
    from genre_tasks.models.model import fit_model, untimed

    fit_t, _ = ds.phase("test")
    logger.info("warm retrain on the test-phase data: %d users, %d items, %d fit positives; %s kept from %s",
                fit_t.n_users, fit_t.n_items, int(fit_t.positives.nnz),
                "strategy, lambda, fusion weights" if isinstance(source, fusion.FusionRecommender)
                else "strategy and hyper-parameters", p.warm_from)
    finals: dict[str, dict[int, Any]] = {}
    results: dict[str, dict] = {}
    curves: list[dict] = []
    keep = {"warm_from": p.warm_from, "fit_phase": "test", "seed": p.seed, "selection_metric": None}
    ease_src = getattr(source, "ease", source)  # a fusion model's EASE, or an EASE champion
    _, tower_src = warm_plan(source)
    if isinstance(ease_src, linear.EaseRecommender):
        t0 = time.perf_counter()
        rec = linear.fit_ease(fit_t, ease_src.lam)
        rec.meta.update(keep)
        finals["ease"] = {p.seed: rec}
        results["ease"] = {"lambda": rec.lam, "seconds": round(time.perf_counter() - t0, 2)}
    if tower_src is not None:
        t0 = time.perf_counter()
        strategy = tower_src.strategy
        res = fit_model(p, strategy, fit_t, None, epochs=p.warm_epochs, show_progress=True,
                        live=stage_logging.epoch_logger(strategy, paths, phase="refit"), init=tower_src)
        rec = res.recommender
        rec.meta.update({**keep, "best_epoch": None, "history": [], "refit_history": untimed(res.curve)})
        finals[strategy] = {p.seed: rec}
        per_epoch = [c["seconds"] for c in res.curve]
        results[strategy] = {"epochs_refit": len(res.curve), "examples_test": res.n_examples,
                             "seconds_per_epoch": round(float(np.median(per_epoch)), 3),
                             "seconds": round(time.perf_counter() - t0, 2)}
        curves += [{"strategy": strategy, "epoch": c["epoch"], "train_loss": c["train_loss"],
                    "valid_ndcg@10": None, "seconds": c["seconds"]} for c in res.curve]
        logger.info("%s: fine-tuned %d epochs from %s (loss %s)", strategy, len(res.curve), p.warm_from,
                    ", ".join(f"{c['train_loss']:.4f}" for c in res.curve))
    if isinstance(source, fusion.FusionRecommender):
        q_test, q_unknown = fusion.quality_prior(fit_t)
        quality = ([str(i) for i in fit_t.item_ids], q_test, q_unknown)
        rec = fusion.FusionRecommender(finals["ease"][p.seed], finals[tower_src.strategy][p.seed], source.weight,
                                       keep, source.prior_weight, quality)
        finals[fusion.STRATEGY] = {p.seed: rec}
        results[fusion.STRATEGY] = {"weight": source.weight, "prior_weight": source.prior_weight,
                                    "tower": tower_src.strategy, "lambda": rec.ease.lam}
    best = getattr(source, "strategy", None) or next(iter(finals))
    for strategy in finals:
        results[strategy].update({"seeds": [p.seed], "warm": "kept the champion's validated choices",
                                  "peak_rss_mb": round(logs.peak_rss_mb(), 1)})
    selected = {"strategy": best, "selection_metric": None,
                "rule": f"warm retrain of {p.warm_from}: its strategy, with the choices its full run "
                        "validated (train.warm_revalidate false)",
                "valid_ndcg@10": {s: None for s in finals}}
    return finals, results, curves, selected


def run(p: TrainParams, paths: S.Paths) -> dict:
    passive_openmp()
    from genre_tasks.models import fusion, linear
    from genre_tasks.models import model as M

    with logs.stage("train", paths) as log:
        warm_tower, warm_from = None, None
        if p.mode == "warm":
            source = load_warm_source(p.warm_from, paths)
            if source is None:
                log.logger.warning("train.mode warm: nothing to start from at %s; training in full", p.warm_from)
            else:
                strategies, warm_tower = warm_plan(source)
                lam = getattr(getattr(source, "ease", source), "lam", None)  # keep the champion's lambda
                p = dataclasses.replace(p, strategies=strategies, extra_seeds=(), epochs=p.warm_epochs,
                                        fusion_tower=warm_tower.strategy if warm_tower is not None else p.fusion_tower,
                                        ease_lambda=(float(lam),) if lam else p.ease_lambda)
                warm_from = p.warm_from
                log.logger.info("warm start from %s: retraining %s, %s %d epochs", p.warm_from, list(strategies),
                                "early stopping on valid within" if p.warm_revalidate else
                                "the champion's validated choices kept, fine-tuned for", p.warm_epochs)
        ds = Dataset.load(paths)
        for path in (paths.items, paths.item_split, paths.interactions, paths.histories, paths.vectors, paths.vector_index,
                     paths.genre_predictions):
            if path.exists():  # genre predictions are optional (items may all have genres)
                log.read(path)
        if warm_from is not None and not p.warm_revalidate:
            finals, results, curves, selected = fit_warm(p, source, ds, paths, log.logger)
        else:
            finals, results, curves, selected = fit_all(p, ds, paths, log.logger, warm_tower, warm_from)
        best, selection_metric = selected["strategy"], selected["selection_metric"]
        curve_df = pd.DataFrame(curves, columns=["strategy", "epoch", "train_loss", "valid_ndcg@10", "seconds"])

        def save(rec, d: Path) -> None:
            d.mkdir(parents=True, exist_ok=True)
            if isinstance(rec, fusion.FusionRecommender):
                fusion.save(rec, d)
            elif isinstance(rec, linear.EaseRecommender):
                linear.save(rec, d)
            else:
                M.save(rec, d)

        with io.atomic_dir(paths.model_dir) as tmp:
            for strategy, by_seed in finals.items():
                d = tmp / strategy
                save(by_seed[p.seed], d)
                c = curve_df[curve_df["strategy"] == strategy].drop(columns=["strategy", "seconds"])
                io.write_text(c.to_csv(index=False), d / "curve.csv")
                for seed, rec in by_seed.items():
                    if seed != p.seed:
                        save(rec, tmp / SEEDS_DIR / strategy / str(seed))
            io.write_json(selected, tmp / "selected.json")
            if selection_metric is None:  # a warm retrain: no validation phase, its training loss
                _plot(curve_df, tmp / "train_curve.png", "training loss", "train_loss",
                      "warm retrain: training loss per epoch (train + valid)")
            else:
                _plot(curve_df, tmp / "train_curve.png", f"validation {selection_metric}")
        log.wrote(paths.model_dir, f"{len(finals)} model(s), selected {best}")

        io.write_text(curve_df.drop(columns="seconds").to_csv(index=False), paths.plots_dir / "train_curve.csv")
        log.wrote(paths.plots_dir / "train_curve.csv")
        summary = {"selected": best, "selection_metric": selection_metric, "selection_rule": selected["rule"],
                   "mode": "warm" if warm_from is not None else "full", "warm_from": warm_from,
                   "seeds": list(p.seeds), "strategies": results, "valid_users": selected.get("valid_users"),
                   "seconds": round(log.seconds, 2), "peak_rss_mb": round(logs.peak_rss_mb(), 1)}
        io.write_json(summary, paths.metrics("train"))
        log.wrote(paths.metrics("train"))
        return summary

def main(params: dict, paths: S.Paths) -> dict:
    """CLI/DAG entry point: ``run`` with the ``train`` section of ``params``."""
    return run(config.section(TrainParams, "train", params), paths)

