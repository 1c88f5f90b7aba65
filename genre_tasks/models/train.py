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

``data/model/<strategy>/model.pt``   state_dict of genre_tasks.models.model.TwoTower
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

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
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

#: two-tower item towers (genre_tasks.models.model) + the registrable EASE
#: (genre_tasks.models.linear) + the validated blend of both (genre_tasks.models.fusion)
TWO_TOWER = ("content", "collaborative", "hybrid")
STRATEGIES = (*TWO_TOWER, "ease", "fusion")
DEFAULT_STRATEGIES = ("content", "ease", "fusion")
METRIC = "ndcg@10"
#: extra-seed models (for selection and the mean ± sd report): data/model/_seeds/<strategy>/<seed>/
SEEDS_DIR = "_seeds"
DEFAULT_FUSION_WEIGHTS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


@dataclass(frozen=True)
class TrainParams:
    """``train`` section of params.yaml.

    strategies           what to train: content | collaborative | hybrid (two-tower item towers)
                         | ease (EASE, closed form, lambda chosen on valid from ``ease_lambda``)
                         | fusion (the validated blend of ease and ``fusion_tower``; both must be
                         listed too: their models are its components)
    ease_lambda          the validation grid of the ``ease`` strategy's L2 weight
    extra_seeds          stochastic strategies (two-tower, fusion) are also trained with these
                         seeds; selection uses the mean validation metric over ``seed`` and these,
                         the evaluate stage reports mean ± sd over them. The registered model is
                         the ``seed`` one.
    refit                true: the test-phase model of a two-tower strategy is re-trained from
                         scratch on train + valid for the best epoch count; false: the
                         early-stopping run's best-epoch model (fitted on train) is reused
    fusion_tower         the two-tower strategy fusion blends with ease
    fusion_weights       the validation grid of the tower's weight w in fusion (0 = ease, 1 = tower)
    fusion_prior_weights the validation grid of fusion's quality-prior weight v (genre_tasks.models.fusion)
    fusion_auc_tolerance fusion's (w, v) maximise valid nDCG@10 among the blends whose valid
                         impression AUC is at least EASE's minus this (the gate's AUC guardrail):
                         a blend may not buy nDCG with a worse liked-vs-disliked ranking
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
    dislike_weight       weight of a pairwise term pushing each target above one of its user's
                         "seen, not liked" fit items (rating below the positive threshold); 0 = off
                         (full softmax only). Teaches the tower liked-vs-disliked (impression AUC)
    mode                 full = train every strategy from scratch; warm = retrain only the strategy
                         of ``warm_from`` (and its fusion components), starting from its weights,
                         one seed, at most ``warm_epochs`` epochs with early stopping (feedback
                         retrains); without a model at ``warm_from`` it falls back to full
    warm_from            the model to start from: a strategy folder (relative to the project root,
                         e.g. a champion's bundle ``model/``) or a registry URI such as
                         ``models:/genre-recommender@champion``
    warm_epochs          the epoch budget of a warm start
    ema_decay            0 = off; else evaluate and save an exponential moving average of the
                         weights (per step t: ema = d * ema + (1 - d) * weights with
                         d = min(ema_decay, (1 + t) / (10 + t)))
    """

    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    ease_lambda: tuple[float, ...] = (50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0)
    extra_seeds: tuple[int, ...] = ()
    refit: bool = True
    fusion_tower: Literal["content", "collaborative", "hybrid"] = "content"
    fusion_weights: tuple[float, ...] = DEFAULT_FUSION_WEIGHTS
    fusion_prior_weights: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    fusion_auc_tolerance: float = 0.01
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
    dislike_weight: float = 0.0
    mode: Literal["full", "warm"] = "full"
    warm_from: str | None = None
    warm_epochs: int = 5

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
        if "fusion" in self.strategies:
            missing = [c for c in ("ease", self.fusion_tower) if c not in self.strategies]
            if missing:
                raise ParamsError(f"train.strategies: fusion blends ease and train.fusion_tower "
                                  f"({self.fusion_tower}); add {missing} to the list")
            if not self.fusion_weights or not all(0.0 <= w <= 1.0 for w in self.fusion_weights):
                raise ParamsError(f"train.fusion_weights: need values in [0, 1], got {list(self.fusion_weights)}")
            if not self.fusion_prior_weights or min(self.fusion_prior_weights) < 0 or self.fusion_auc_tolerance < 0:
                raise ParamsError("train.fusion_prior_weights / fusion_auc_tolerance: need values >= 0")
        if self.seed in self.extra_seeds or len(set(self.extra_seeds)) != len(self.extra_seeds):
            raise ParamsError(f"train.extra_seeds: {list(self.extra_seeds)} must be distinct and differ "
                              f"from train.seed {self.seed}")
        if "ease" in self.strategies and (not self.ease_lambda or min(self.ease_lambda) <= 0):
            raise ParamsError(f"train.ease_lambda: need values > 0, got {list(self.ease_lambda)}")
        if self.mode == "warm" and not self.warm_from:
            raise ParamsError("train.warm_from: a model folder or models:/ URI is needed with train.mode warm")
        if self.warm_epochs < 1 or self.dislike_weight < 0:
            raise ParamsError("train.warm_epochs must be >= 1 and train.dislike_weight >= 0")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ParamsError("train.lr must be > 0 and train.weight_decay >= 0")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["strategies"] = list(self.strategies)
        d["ease_lambda"] = list(self.ease_lambda)
        d["extra_seeds"] = list(self.extra_seeds)
        d["fusion_weights"] = list(self.fusion_weights)
        d["fusion_prior_weights"] = list(self.fusion_prior_weights)
        return d

    @property
    def seeds(self) -> tuple[int, ...]:
        """``seed`` (the registered model's) then ``extra_seeds``."""
        return (self.seed, *self.extra_seeds)


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


def warm_state(net, init, item_ids) -> dict:
    """``init``'s (a TorchRecommender) weights for ``net`` (same strategy and sizes): every tensor
    as it is, except the id tables, whose rows are matched by item id (items ``init`` never saw
    keep their fresh initialisation: new ids are appended, not re-learnt from scratch)."""
    state = {k: v.clone() for k, v in init.net.state_dict().items()}
    own = net.state_dict()
    if "id_emb.weight" in own:
        pos = {iid: k for k, iid in enumerate(init.item_ids)}
        for key in ("id_emb.weight", "id_bias.weight"):
            fresh = own[key].clone()
            for row, iid in enumerate(item_ids):
                k = pos.get(str(iid))
                if k is not None:
                    fresh[row] = state[key][k]
            state[key] = fresh
        state["id_known"] = own["id_known"].clone()
    return state


def fit_model(p: TrainParams, strategy: str, fit: FitData, ev: EvalData | None = None,
              epochs: int | None = None, show_progress: bool = True,
              on_epoch: Callable[[int, float, float], None] | None = None,
              live: Callable[..., None] | None = None, init: Any = None) -> FitResult:
    """Train ``strategy`` on ``fit``.

    With ``ev``: up to ``epochs`` (default p.epochs) epochs, evaluating nDCG@10 after each and
    stopping after ``p.patience`` epochs without improvement; best_epoch = the best one.
    Without ``ev``: exactly ``epochs`` epochs (best_epoch = epochs). The returned recommender
    holds the weights of the best epoch (with ``ev``) or of the last one (without).
    ``init``: a TorchRecommender of the same strategy to start from (warm start: its weights,
    its genre vocabulary, id rows matched by item id) instead of a random initialisation.
    """
    _passive_openmp()
    from tqdm.auto import tqdm

    from genre_tasks.models import model as M

    epochs = p.epochs if epochs is None else int(epochs)
    t_start = time.perf_counter()
    with deterministic(p.seed, p.threads):
        genre_names = list(init.genre_names) if init is not None else list(fit.genre_names)
        if init is not None:  # the architecture is the one being warm-started
            ip = init.params
            p = dataclasses.replace(p, dim=int(ip["dim"]), hidden=int(init.meta["hidden"]),
                                    pooling=ip["pooling"], history_max=int(ip["history_max"]))
        net = M.TwoTower(strategy, n_ids=fit.n_items, vec_dim=int(fit.item_vectors.shape[1]),
                         n_genres=len(genre_names), dim=p.dim, hidden=p.hidden, pooling=p.pooling,
                         dropout=p.dropout, history_max=p.history_max,
                         id_dropout=p.id_dropout if strategy == "hybrid" else 0.0)
        if init is not None:
            if init.strategy != strategy:
                raise ValueError(f"warm start: {init.strategy} weights for a {strategy} model")
            net.load_state_dict(warm_state(net, init, fit.item_ids))
        trainer = M.Trainer(net, fit, loss=p.loss, negatives=p.negatives,
                            negative_sampling=p.negative_sampling, logq_correction=p.logq_correction,
                            batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                            use_genres=p.use_genres, genre_names=genre_names, seed=p.seed,
                            ema_decay=p.ema_decay, dislike_weight=p.dislike_weight)
        meta = {"strategy": strategy, "params": p.as_dict(), "item_ids": [str(i) for i in fit.item_ids],
                "genre_names": genre_names, "vec_dim": int(fit.item_vectors.shape[1]),
                "dim": p.dim, "hidden": p.hidden, "id_dropout": net.id_dropout,
                "fit_phase": fit.phase, "n_examples": trainer.n_examples}
        rec = M.TorchRecommender(trainer.model, meta)
        eval_u = eval_users(ev)[0] if ev is not None else None
        use_eval = eval_u is not None and len(eval_u) > 0
        curve: list[dict] = []
        best, best_epoch, since = -math.inf, 0, 0
        best_state = None
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
                best_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            else:
                since += 1
                if since >= p.patience:
                    break
        if best_state is not None:  # the early-stopping run ends on its best epoch's weights
            trainer.model.load_state_dict(best_state)
        net.eval()
    rec.meta["best_epoch"] = best_epoch
    rec.meta["history"] = _untimed(curve)
    return FitResult(recommender=rec, curve=curve, best_epoch=best_epoch,
                     best_ndcg=best if use_eval else float("nan"), n_examples=trainer.n_examples,
                     seconds=time.perf_counter() - t_start)


def _untimed(curve: list[dict]) -> list[dict]:
    return [{k: v for k, v in c.items() if k != "seconds"} for c in curve]


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
    out = []
    for w, v in grid:
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
        out.append((sel, full, auc))
    return out


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


def fit_tower(p: TrainParams, strategy: str, fit_v: FitData, ev_v: EvalData, fit_t: FitData,
              selection_metric: str, live=None, live_refit=None, init=None) -> tuple[Any, Any, dict, FitResult]:
    """One two-tower strategy, one seed (``p.seed``): early stopping on valid, then the test-phase
    model (refit on train + valid for the best epoch count, or the early-stopping run's model
    when ``p.refit`` is false). ``init``: warm start both fits from this model's weights.
    Returns (test-phase model, valid-phase model, record, FitResult)."""
    res = fit_model(p, strategy, fit_v, ev_v, live=live, init=init)
    valid_rec = res.recommender
    if p.refit:
        final = fit_model(p, strategy, fit_t, None, epochs=res.best_epoch, show_progress=True, live=live_refit,
                          init=init)
        rec = final.recommender
        refit_curve, examples_test = final.curve, final.n_examples
    else:
        import copy

        rec = copy.copy(valid_rec)  # same weights; its own meta
        rec.meta = dict(valid_rec.meta)
        refit_curve, examples_test = [], None
    # no timings in data/model: two runs must write byte-identical files
    rec.meta.update({"best_epoch": res.best_epoch, "fit_phase": "test" if p.refit else "valid",
                     "history": _untimed(res.curve), "valid_ndcg@10": _finite(res.best_ndcg),
                     "selection_metric": selection_metric, "refit_history": _untimed(refit_curve),
                     "seed": p.seed})
    per_epoch = [c["seconds"] for c in res.curve + refit_curve]
    record = {"best_epoch": res.best_epoch, "valid_ndcg@10": _finite(res.best_ndcg),
              "epochs_run": len(res.curve), "epochs_refit": len(refit_curve),
              "seconds_per_epoch": round(float(np.median(per_epoch)), 3) if per_epoch else None,
              "examples_valid": res.n_examples, "examples_test": examples_test}
    return rec, valid_rec, record, res


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


def load_warm_source(spec: str, paths: S.Paths):
    """The recommender a warm start begins from (``train.warm_from``), or None if there is none
    (no such folder, no such registered model/alias)."""
    if spec.startswith("models:/"):
        try:
            from genre_tasks.registry import serving

            tracking.configure(paths)
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


def run(p: TrainParams, paths: S.Paths) -> dict:
    _passive_openmp()
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
                log.logger.info("warm start from %s: retraining %s for at most %d epochs", p.warm_from,
                                list(strategies), p.warm_epochs)
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
                    p, fit_v, ev_v, fit_t, live=tracking.epoch_logger(strategy, paths))
                log.logger.info("ease: lambda %s chosen on valid (%s %.4f; grid %s)", rec.lam, selection_metric,
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
                log.logger.info("fusion: tower weight %s, quality-prior weight %s chosen on valid (mean over seeds "
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
                for seed in p.seeds:
                    ps = dataclasses.replace(p, seed=seed)
                    main_seed = seed == p.seed
                    rec, rec_v, record, res = fit_tower(
                        ps, strategy, fit_v, ev_v, fit_t, selection_metric,
                        live=tracking.epoch_logger(strategy, paths) if main_seed else None,
                        live_refit=tracking.epoch_logger(strategy, paths, phase="refit") if main_seed else None,
                        init=warm_tower if warm_tower is not None and warm_tower.strategy == strategy else None)
                    if warm_from is not None:
                        rec.meta["warm_from"] = warm_from
                    log.logger.info("%s seed %d: best epoch %d, valid %s %.4f (%d epochs run, %d refit)", strategy,
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
                    "valid_ndcg@10": scores}
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
            _plot(curve_df, tmp / "train_curve.png", f"validation {selection_metric}")
        log.wrote(paths.model_dir, f"{len(finals)} model(s), selected {best}")

        io.write_text(curve_df.drop(columns="seconds").to_csv(index=False), paths.plots_dir / "train_curve.csv")
        log.wrote(paths.plots_dir / "train_curve.csv")
        summary = {"selected": best, "selection_metric": selection_metric, "selection_rule": selected["rule"],
                   "mode": "warm" if warm_from is not None else "full", "warm_from": warm_from,
                   "seeds": list(p.seeds), "strategies": results,
                   "seconds": round(log.seconds, 2), "peak_rss_mb": round(logs.peak_rss_mb(), 1)}
        io.write_json(summary, paths.metrics("train"))
        log.wrote(paths.metrics("train"))
        return summary

def main(params: dict, paths: S.Paths) -> dict:
    """CLI/DAG entry point: ``run`` with the ``train`` section of ``params``."""
    return run(config.section(TrainParams, "train", params), paths)

