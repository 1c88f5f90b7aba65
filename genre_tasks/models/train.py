"""train stage: fit the two-tower recommender (genre_tasks.models.model) per strategy, pick the best.

For each strategy in ``train.strategies``:

1. fit on the ``valid`` phase (FitData = train split) with early stopping on validation
   nDCG@10 (full ranking, seen items excluded; in the cold_items split: ranking only the cold
   validation items for the users with cold targets), ``patience`` epochs without improvement;
2. re-fit from scratch, same seed, on the ``test`` phase (train + valid) for the best epoch
   count, and save that model (the one evaluate / promote / serving use).

The selected strategy is the best one by validation nDCG@10: a model-selection choice made
on the validation split only.

Outputs (``data/model`` is written as a whole, atomically):

``data/model/<strategy>/model.pt``   state_dict of genre_tasks.models.model.TwoTower
``data/model/<strategy>/meta.json``  params, strategy, item_ids (id-table order), genre_names,
                                     vec_dim, dim, hidden, best_epoch, fit_phase "test",
                                     history (per epoch: train_loss, valid_ndcg@10); no
                                     timings, so two runs write byte-identical files
``data/model/<strategy>/curve.csv``  epoch, train_loss, valid_ndcg@10
``data/model/selected.json``         {"strategy", "selection_metric", "valid_ndcg@10": {strategy: value}}
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

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from genre_tasks import config, io, logs
from genre_tasks.registry import tracking
from genre_tasks import schema as S
from genre_tasks.config import ParamsError
from genre_tasks.models.views import Dataset, EvalData, FitData

#: two-tower item towers (genre_tasks.models.model) + the registrable EASE (genre_tasks.models.linear)
TWO_TOWER = ("content", "collaborative", "hybrid")
STRATEGIES = (*TWO_TOWER, "ease")
DEFAULT_STRATEGIES = STRATEGIES
METRIC = "ndcg@10"


@dataclass(frozen=True)
class TrainParams:
    """``train`` section of params.yaml.

    strategies           what to train: content | collaborative | hybrid (two-tower item towers)
                         | ease (EASE, closed form, lambda chosen on valid from ``ease_lambda``)
    ease_lambda          the validation grid of the ``ease`` strategy's L2 weight
    pooling              user tower pooling: attention (NRMS additive) | mean
    loss                 softmax (sampled softmax) | bpr
    negatives            negatives per positive; 0 = full softmax over the catalogue (softmax only)
    negative_sampling    popularity (popularity^0.75) | uniform, over items with >= 1 fit positive
    use_genres           genre multi-hot features in the content item tower
    dim                  embedding size of both towers
    history_max          most recent positives the user tower reads
    dropout              dropout in the content MLP and on the pooled history
    epochs               maximum epochs (early stopping may stop sooner)
    patience             epochs without a better validation nDCG@10 before stopping
    batch_size, lr, weight_decay   Adam
    seed, threads        determinism and torch intra-op threads
    no_history_fallback  scores for users with an empty history: popularity | genre_prior
    logq_correction      subtract log q(item) of the negative sampler from the logits
    hidden               hidden width of the content MLP
    id_dropout           hybrid only: probability of dropping an item's id part in training
    ema_decay            0 = off; else evaluate and save an exponential moving average of the
                         weights (per step t: ema = d * ema + (1 - d) * weights with
                         d = min(ema_decay, (1 + t) / (10 + t)))
    """

    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    ease_lambda: tuple[float, ...] = (50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0)
    pooling: Literal["attention", "mean"] = "attention"
    loss: Literal["softmax", "bpr"] = "softmax"
    negatives: int = 0
    negative_sampling: Literal["popularity", "uniform"] = "popularity"
    use_genres: bool = True
    dim: int = 64
    history_max: int = 50
    dropout: float = 0.0
    epochs: int = 30
    patience: int = 3
    batch_size: int = 1024
    lr: float = 0.005
    weight_decay: float = 0.0
    seed: int = 42
    threads: int = 2
    no_history_fallback: Literal["popularity", "genre_prior"] = "popularity"
    logq_correction: bool = False
    hidden: int = 256
    id_dropout: float = 0.1
    ema_decay: float = 0.98

    def validate(self) -> None:
        if not self.strategies:
            raise ParamsError("train.strategies: at least one strategy is needed")
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad or len(set(self.strategies)) != len(self.strategies):
            raise ParamsError(f"train.strategies: {list(self.strategies)} must be distinct values "
                              f"of {list(STRATEGIES)}")
        for name in ("dim", "history_max", "epochs", "patience", "batch_size", "threads", "hidden"):
            if getattr(self, name) < 1:
                raise ParamsError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        if self.negatives < 0 or (self.loss == "bpr" and self.negatives == 0):
            raise ParamsError(f"train.negatives: must be >= 1 for bpr and >= 0 for softmax, got {self.negatives}")
        if not all(0.0 <= v < 1.0 for v in (self.dropout, self.id_dropout, self.ema_decay)):
            raise ParamsError("train.dropout / id_dropout / ema_decay: must be in [0, 1)")
        if "ease" in self.strategies and (not self.ease_lambda or min(self.ease_lambda) <= 0):
            raise ParamsError(f"train.ease_lambda: need values > 0, got {list(self.ease_lambda)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ParamsError("train.lr must be > 0 and train.weight_decay >= 0")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["strategies"] = list(self.strategies)
        d["ease_lambda"] = list(self.ease_lambda)
        return d


# --- determinism -----------------------------------------------------------------------------

def _passive_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spin (OMP_WAIT_POLICY=PASSIVE, unless set).

    Only effective before torch is first imported. On a shared 2-core machine, spinning
    threads made 2-thread training 5-8x slower than 1 thread under load; passive waiting
    removed that (measured in benchmarks/bench_train.py's session).
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@contextlib.contextmanager
def deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seed torch, force deterministic algorithms and ``threads`` threads; restore afterwards."""
    import torch

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)


# --- validation metric -----------------------------------------------------------------------

def eval_users(ev: EvalData) -> tuple[np.ndarray, list, np.ndarray | None]:
    """(users, targets, candidates) the early-stopping metric is computed on.

    cold_items split: the users with cold targets ranking only the cold items; else all
    evaluated users ranking the whole catalogue.
    """
    if ev.cold_items is not None:
        return ev.cold_users, ev.cold_targets, ev.cold_items
    return ev.users, ev.targets, None


def validation_ndcg(rec, fit: FitData, ev: EvalData, seed: int = 42, batch: int = 2048) -> float:
    """Mean nDCG@10 of ``rec`` on ``ev`` (seen items of ``fit`` excluded); NaN without users."""
    from genre_tasks.evaluation import metrics

    users, targets, candidates = eval_users(ev)
    if users is None or len(users) == 0:
        return float("nan")
    tie = metrics.tie_order(fit.n_items, seed)
    seen = fit.seen.tocsr()
    out = []
    for s in range(0, len(users), batch):
        u = users[s:s + batch]
        scores = rec.score([fit.histories[i] for i in u], fit)
        out.append(metrics.ranking_metrics(scores, targets[s:s + batch], tie=tie, exclude=seen[u],
                                           candidates=candidates)[METRIC])
    return float(np.mean(np.concatenate(out)))


# --- fitting ---------------------------------------------------------------------------------

@dataclass
class FitResult:
    recommender: Any  # genre_tasks.models.model.TorchRecommender
    curve: list[dict]  # per epoch: epoch, train_loss, valid_ndcg@10 (None without eval), seconds
    best_epoch: int
    best_ndcg: float
    n_examples: int
    seconds: float


def fit_model(p: TrainParams, strategy: str, fit: FitData, ev: EvalData | None = None,
              epochs: int | None = None, show_progress: bool = True,
              on_epoch: Callable[[int, float, float], None] | None = None,
              live: Callable[..., None] | None = None) -> FitResult:
    """Train ``strategy`` on ``fit``.

    With ``ev``: up to ``epochs`` (default p.epochs) epochs, evaluating nDCG@10 after each and
    stopping after ``p.patience`` epochs without improvement; best_epoch = the best one.
    Without ``ev``: exactly ``epochs`` epochs (best_epoch = epochs). The returned recommender
    holds the weights after the last epoch run.
    """
    _passive_openmp()
    from tqdm.auto import tqdm

    from genre_tasks.models import model as M

    epochs = p.epochs if epochs is None else int(epochs)
    t_start = time.perf_counter()
    with deterministic(p.seed, p.threads):
        net = M.TwoTower(strategy, n_ids=fit.n_items, vec_dim=int(fit.item_vectors.shape[1]),
                         n_genres=len(fit.genre_names), dim=p.dim, hidden=p.hidden, pooling=p.pooling,
                         dropout=p.dropout, history_max=p.history_max,
                         id_dropout=p.id_dropout if strategy == "hybrid" else 0.0)
        trainer = M.Trainer(net, fit, loss=p.loss, negatives=p.negatives,
                            negative_sampling=p.negative_sampling, logq_correction=p.logq_correction,
                            batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                            use_genres=p.use_genres, genre_names=fit.genre_names, seed=p.seed,
                            ema_decay=p.ema_decay)
        meta = {"strategy": strategy, "params": p.as_dict(), "item_ids": [str(i) for i in fit.item_ids],
                "genre_names": list(fit.genre_names), "vec_dim": int(fit.item_vectors.shape[1]),
                "dim": p.dim, "hidden": p.hidden, "id_dropout": net.id_dropout,
                "fit_phase": fit.phase, "n_examples": trainer.n_examples}
        rec = M.TorchRecommender(trainer.model, meta)
        eval_u = eval_users(ev)[0] if ev is not None else None
        use_eval = eval_u is not None and len(eval_u) > 0
        curve: list[dict] = []
        best, best_epoch, since = -math.inf, 0, 0
        for e in range(1, epochs + 1):
            t0 = time.perf_counter()
            bar = (lambda it, e=e: tqdm(it, desc=f"train {strategy} epoch {e}", unit="batch",
                                        leave=False, disable=None if show_progress else True))
            loss = trainer.epoch(bar)
            seconds = time.perf_counter() - t0
            ndcg = validation_ndcg(rec, fit, ev, p.seed) if use_eval else None
            curve.append({"epoch": e, "train_loss": loss, "valid_ndcg@10": ndcg, "seconds": seconds})
            if on_epoch is not None:
                on_epoch(e, loss, seconds)
            if live is not None:
                live(e, loss, seconds, ndcg)
            if not use_eval:
                best_epoch = e
                continue
            if ndcg > best:
                best, best_epoch, since = ndcg, e, 0
            else:
                since += 1
                if since >= p.patience:
                    break
        net.eval()
    rec.meta["best_epoch"] = best_epoch
    rec.meta["history"] = _untimed(curve)
    return FitResult(recommender=rec, curve=curve, best_epoch=best_epoch,
                     best_ndcg=best if use_eval else float("nan"), n_examples=trainer.n_examples,
                     seconds=time.perf_counter() - t_start)


def _untimed(curve: list[dict]) -> list[dict]:
    return [{k: v for k, v in c.items() if k != "seconds"} for c in curve]


def load_recommender(model_dir: str | Path):
    """The recommender saved under ``model_dir``: an EaseRecommender (genre_tasks.models.linear) or a
    TorchRecommender (genre_tasks.models.model.load_recommender)."""
    from genre_tasks.models import linear

    if linear.is_saved(model_dir):
        return linear.load(model_dir)
    from genre_tasks.models.model import load_recommender as _load

    return _load(model_dir)


def fit_ease_strategy(p: TrainParams, fit_v: FitData, ev_v: EvalData, fit_t: FitData,
                      live: Callable[..., None] | None = None) -> tuple[Any, list[dict], float, int]:
    """``ease``: lambda chosen on valid (fit on train) from ``p.ease_lambda``, refit on the
    test-phase data. Returns (recommender, curve rows (one per grid value), best valid nDCG@10,
    index of the best value, 1-based). ``live(step, loss, seconds, ndcg)`` is called after each
    grid value (step = its 1-based index), like fit_model's per-epoch callback."""
    from genre_tasks.models import linear

    curve, best, best_i = [], -math.inf, 1
    for i, lam in enumerate(p.ease_lambda, 1):
        t0 = time.perf_counter()
        ndcg = validation_ndcg(linear.fit_ease(fit_v, lam), fit_v, ev_v, p.seed)
        curve.append({"epoch": i, "train_loss": None, "valid_ndcg@10": ndcg,
                      "seconds": time.perf_counter() - t0, "lambda": lam})
        if live is not None:
            live(i, None, curve[-1]["seconds"], ndcg)
        if ndcg > best:
            best, best_i = ndcg, i
    rec = linear.fit_ease(fit_t, p.ease_lambda[best_i - 1])
    rec.meta["valid_grid"] = [{"lambda": c["lambda"], "valid_ndcg@10": c["valid_ndcg@10"]} for c in curve]
    return rec, curve, best, best_i


# --- outputs ---------------------------------------------------------------------------------

def _plot(curves: pd.DataFrame, path: Path, metric_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for strategy, g in curves.groupby("strategy", sort=False):
        ax.plot(g["epoch"], g["valid_ndcg@10"], marker="o", label=strategy)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric_label)
    ax.set_title("train: validation nDCG@10 per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def run(p: TrainParams, paths: S.Paths) -> dict:
    _passive_openmp()
    from genre_tasks.models import model as M

    with logs.stage("train", paths) as log:
        ds = Dataset.load(paths)
        for path in (paths.items, paths.interactions, paths.histories, paths.vectors, paths.vector_index,
                     paths.genre_predictions):
            if path.exists():  # genre predictions are optional (items may all have genres)
                log.read(path)
        fit_v, ev_v = ds.phase("valid")
        fit_t, _ = ds.phase("test")
        cold = ev_v.cold_items is not None
        selection_metric = "cold_ndcg@10" if cold else "ndcg@10"
        users = eval_users(ev_v)[0]
        log.logger.info("valid phase: %d users, %d items, %d fit positives; early stopping on %s "
                        "over %d users", fit_v.n_users, fit_v.n_items, int(fit_v.positives.nnz),
                        selection_metric, 0 if users is None else len(users))

        results: dict[str, dict] = {}
        finals: dict[str, Any] = {}
        curves = []
        for strategy in p.strategies:
            t0 = time.perf_counter()
            if strategy == "ease":
                rec, curve, best_ndcg, best_i = fit_ease_strategy(p, fit_v, ev_v, fit_t,
                                                                  live=tracking.epoch_logger(strategy, paths))
                log.logger.info("ease: lambda %s chosen on valid (%s %.4f; grid %s)", rec.lam, selection_metric,
                                best_ndcg, ", ".join(f"{c['lambda']:g}: {c['valid_ndcg@10']:.4f}" for c in curve))
                rec.meta.update({"valid_ndcg@10": _finite(best_ndcg), "selection_metric": selection_metric})
                finals[strategy] = rec
                results[strategy] = {"best_epoch": best_i, "valid_ndcg@10": _finite(best_ndcg),
                                     "lambda": rec.lam, "epochs_run": len(curve),
                                     "seconds": round(time.perf_counter() - t0, 2),
                                     "peak_rss_mb": round(logs.peak_rss_mb(), 1)}
                curves += [{"strategy": strategy, "epoch": c["epoch"], "train_loss": c["train_loss"],
                            "valid_ndcg@10": c["valid_ndcg@10"], "seconds": c["seconds"]} for c in curve]
                continue
            # per-epoch curves logged live into the pipeline's MLflow run (if there is one)
            res = fit_model(p, strategy, fit_v, ev_v, live=tracking.epoch_logger(strategy, paths))
            log.logger.info("%s: best epoch %d, valid %s %.4f (%d epochs run, %d examples)", strategy,
                            res.best_epoch, selection_metric, res.best_ndcg, len(res.curve), res.n_examples)
            final = fit_model(p, strategy, fit_t, None, epochs=res.best_epoch, show_progress=True,
                              live=tracking.epoch_logger(strategy, paths, phase="refit"))
            rec = final.recommender
            # no timings in data/model: two runs must write byte-identical files
            rec.meta.update({"best_epoch": res.best_epoch, "fit_phase": "test", "history": _untimed(res.curve),
                             "valid_ndcg@10": _finite(res.best_ndcg), "selection_metric": selection_metric,
                             "refit_history": _untimed(final.curve)})
            finals[strategy] = rec
            per_epoch = [c["seconds"] for c in res.curve + final.curve]
            results[strategy] = {
                "best_epoch": res.best_epoch,
                "valid_ndcg@10": _finite(res.best_ndcg),
                "epochs_run": len(res.curve),
                "seconds_per_epoch": round(float(np.median(per_epoch)), 3),
                "seconds": round(time.perf_counter() - t0, 2),
                "peak_rss_mb": round(logs.peak_rss_mb(), 1),
                "examples_valid": res.n_examples,
                "examples_test": final.n_examples,
            }
            for c in res.curve:
                curves.append({"strategy": strategy, "epoch": c["epoch"], "train_loss": c["train_loss"],
                               "valid_ndcg@10": c["valid_ndcg@10"], "seconds": c["seconds"]})

        scores = {s: r["valid_ndcg@10"] for s, r in results.items()}
        ranked = [s for s in p.strategies if scores[s] is not None]
        best = max(ranked, key=lambda s: scores[s]) if ranked else p.strategies[0]
        selected = {"strategy": best, "selection_metric": selection_metric, "valid_ndcg@10": scores}
        curve_df = pd.DataFrame(curves, columns=["strategy", "epoch", "train_loss", "valid_ndcg@10", "seconds"])

        with io.atomic_dir(paths.model_dir) as tmp:
            for strategy, rec in finals.items():
                d = tmp / strategy
                d.mkdir(parents=True, exist_ok=True)
                if strategy == "ease":
                    from genre_tasks.models import linear

                    linear.save(rec, d)
                else:
                    M.save(rec, d)
                c = curve_df[curve_df["strategy"] == strategy].drop(columns=["strategy", "seconds"])
                io.write_text(c.to_csv(index=False), d / "curve.csv")
            io.write_json(selected, tmp / "selected.json")
            _plot(curve_df, tmp / "train_curve.png", f"validation {selection_metric}")
        log.wrote(paths.model_dir, f"{len(finals)} model(s), selected {best}")

        io.write_text(curve_df.drop(columns="seconds").to_csv(index=False), paths.plots_dir / "train_curve.csv")
        log.wrote(paths.plots_dir / "train_curve.csv")
        summary = {"selected": best, "selection_metric": selection_metric, "strategies": results,
                   "seconds": round(log.seconds, 2), "peak_rss_mb": round(logs.peak_rss_mb(), 1)}
        io.write_json(summary, paths.metrics("train"))
        log.wrote(paths.metrics("train"))
        return summary


def main(params: dict, paths: S.Paths) -> dict:
    """CLI/DAG entry point: ``run`` with the ``train`` section of ``params``."""
    return run(config.section(TrainParams, "train", params), paths)
