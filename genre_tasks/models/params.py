"""``train`` section of params.yaml (:class:`TrainParams`) and the strategy names.

Below both the network (:mod:`genre_tasks.models.model`, which re-fits with these params) and
the ``train`` stage (:mod:`genre_tasks.models.train`); imports nothing heavy.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Union

from genre_tasks.config import ParamsError

#: two-tower item towers (genre_tasks.models.tower) + the registrable EASE
#: (genre_tasks.models.linear) + the validated blend of both (genre_tasks.models.fusion)
TWO_TOWER = ("content", "collaborative", "hybrid")
STRATEGIES = (*TWO_TOWER, "ease", "fusion")
DEFAULT_STRATEGIES = ("content", "ease", "fusion")
METRIC = "ndcg@10"
#: the hyper-parameters ``search_space`` may name (two-tower strategies)
SEARCHABLE = ("lr", "dim", "hidden", "dropout", "weight_decay", "history_max", "pooling", "dislike_weight",
              "id_dropout", "ema_decay")
DEFAULT_SEARCH_SPACE = {"lr": (0.002, 0.005, 0.01), "dim": (32, 64, 128), "dropout": (0.0, 0.1),
                        "pooling": ("attention", "self_attention")}
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
    parallel_refit       warm (default): a warm retrain runs the refit beside the early-stopping
                         fit, one thread each (the refit keeps its weights per epoch and stops at
                         the best one; ~1.6x faster on 2 cores); always: full runs too; never: one after
                         the other. Only without dropout / hybrid id dropout (torch's global
                         generator) and with threads >= 2. The two orders give the same algorithm
                         but not the same bits: 1 thread per fit rounds differently from 2.
    fusion_tower         the two-tower strategy fusion blends with ease
    fusion_weights       the validation grid of the tower's weight w in fusion (0 = ease, 1 = tower)
    fusion_prior_weights the validation grid of fusion's quality-prior weight v (genre_tasks.models.fusion)
    fusion_auc_tolerance fusion's (w, v) maximise valid nDCG@10 among the blends whose valid
                         impression AUC is at least EASE's minus this (the gate's AUC guardrail):
                         a blend may not buy nDCG with a worse liked-vs-disliked ranking
    pooling              user tower pooling: attention (NRMS additive, with a recency term) | mean
                         | self_attention (sequence-aware: a one-layer SASRec block with position
                         embeddings, read at the most recent position; dim must be even)
    loss                 softmax (sampled softmax) | bpr
    negatives            negatives per positive; 0 = full softmax over the catalogue (softmax only)
    negative_sampling    popularity (popularity^0.75) | uniform, over items with >= 1 fit positive
    negative_sharing     example: k draws per example | batch: k draws shared by a batch's examples
                         (the item tower runs over k extra rows per step, not batch x k: at 168k
                         items 4,000 shared negatives step ~3x faster than 100 per example). Shared
                         negatives need logq_correction (each popular draw is a negative for the
                         whole batch): at 1x, valid nDCG@10 0.0076 without, 0.2102 with (k 4,000)
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
    valid_max_users      early stopping, the fusion grid and the selection on a seeded sample of at
                         most N valid users (null = all): validation ranks every item for each
                         user every epoch (~10 min per epoch at 92,875 users x 168,200 items);
                         the sample is recorded in metrics/train.json (valid_users)
    dislike_weight       weight of a pairwise term pushing each target above one of its user's
                         "seen, not liked" fit items (rating below the positive threshold); 0 = off
                         (full softmax only). Teaches the tower liked-vs-disliked (impression AUC)
    mode                 full = train every strategy from scratch; warm = retrain only the strategy
                         of ``warm_from`` (and its fusion components), starting from its weights,
                         one seed (feedback retrains); without a model at ``warm_from`` it falls
                         back to full
    warm_from            the model to start from: a strategy folder (relative to the project root,
                         e.g. a champion's bundle ``model/``) or a registry URI such as
                         ``models:/genre-recommender@champion``
    warm_epochs          warm: the epochs of fine-tuning the tower on train + valid (with
                         ``warm_revalidate``: the budget of its early stopping on valid)
    warm_revalidate      warm: true (default) = early stopping on valid, refit on train + valid,
                         fusion weights re-chosen on valid; false = keep the choices the
                         champion's full run validated (EASE lambda, fusion weights) and only
                         fine-tune the tower for ``warm_epochs`` epochs on train + valid: ~1.7x
                         faster at 5 epochs, but ~0.004 nDCG@10 below true on three replayed
                         weeks, more with fewer epochs (benchmarks/bench_warm.py, README)
    retrain_mode         the ``mode`` of training runs started by new feedback (the training DAG's
                         asset-triggered runs, unless the Airflow Variable sets ``train.mode``):
                         warm = a feedback retrain from the champion (default), full = as a
                         scheduled run. Scheduled and manual runs use ``mode``
    search_trials        0 = off; else a budgeted hyper-parameter search per two-tower strategy
                         (full mode only): the current values + ``search_trials - 1`` configurations
                         drawn (seeded by ``seed``) from the grid ``search_space``, each fitted on
                         the valid phase with early stopping (seed ``seed``); the best valid
                         metric's values are then used for every seed and the refit. Every trial is
                         in metrics/train.json and an MLflow child run
    search_space         {param: [values]}: the grid (params of SEARCHABLE)
    ema_decay            0 = off; else evaluate and save an exponential moving average of the
                         weights (per step t: ema = d * ema + (1 - d) * weights with
                         d = min(ema_decay, (1 + t) / (10 + t)))
    """

    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    ease_lambda: tuple[float, ...] = (50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0)
    extra_seeds: tuple[int, ...] = ()
    refit: bool = True
    parallel_refit: Literal["never", "warm", "always"] = "warm"
    fusion_tower: Literal["content", "collaborative", "hybrid"] = "content"
    fusion_weights: tuple[float, ...] = DEFAULT_FUSION_WEIGHTS
    fusion_prior_weights: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    fusion_auc_tolerance: float = 0.01
    pooling: Literal["attention", "mean", "self_attention"] = "attention"
    loss: Literal["softmax", "bpr"] = "softmax"
    negatives: int = 0
    negative_sampling: Literal["popularity", "uniform"] = "popularity"
    negative_sharing: Literal["batch", "example"] = "example"
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
    valid_max_users: int | None = None
    mode: Literal["full", "warm"] = "full"
    warm_from: str | None = None
    warm_epochs: int = 5
    warm_revalidate: bool = True
    retrain_mode: Literal["full", "warm"] = "warm"
    search_trials: int = 0
    search_space: dict[str, tuple[Union[float, str], ...]] = field(
        default_factory=lambda: dict(DEFAULT_SEARCH_SPACE))

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
        if self.pooling == "self_attention" and self.dim % 2:
            raise ParamsError(f"train.dim: self_attention pooling (2 heads) needs an even dim, got {self.dim}")
        if self.search_trials < 0:
            raise ParamsError(f"train.search_trials: must be >= 0, got {self.search_trials}")
        for name, values in self.search_space.items():
            if name not in SEARCHABLE:
                raise ParamsError(f"train.search_space.{name}: not searchable; choose from {list(SEARCHABLE)}")
            if not values:
                raise ParamsError(f"train.search_space.{name}: give at least one value")
            for v in values:  # each value must make valid params on its own
                try:
                    self.with_values({name: v})
                except ParamsError as exc:
                    raise ParamsError(f"train.search_space.{name}: value {v!r}: {exc}") from None
        if self.valid_max_users is not None and self.valid_max_users < 1:
            raise ParamsError(f"train.valid_max_users: must be >= 1 or null, got {self.valid_max_users}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ParamsError("train.lr must be > 0 and train.weight_decay >= 0")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["strategies"] = list(self.strategies)
        d["ease_lambda"] = list(self.ease_lambda)
        d["extra_seeds"] = list(self.extra_seeds)
        d["fusion_weights"] = list(self.fusion_weights)
        d["fusion_prior_weights"] = list(self.fusion_prior_weights)
        d["search_space"] = {k: list(v) for k, v in self.search_space.items()}
        return d

    def with_values(self, values: dict) -> "TrainParams":
        """These params with ``values`` (a search configuration) set, checked like params.yaml's
        (an integral float like 64.0 from the search grid fills an int field)."""
        from genre_tasks.config import from_dict

        d = {**self.as_dict(), "search_space": {}, "search_trials": 0}
        for name, v in values.items():
            cur = getattr(self, name)
            d[name] = int(v) if isinstance(cur, int) and isinstance(v, float) and v.is_integer() else v
        out = from_dict(TrainParams, d, "train")
        return dataclasses.replace(out, search_space=self.search_space, search_trials=self.search_trials)

    @property
    def seeds(self) -> tuple[int, ...]:
        """``seed`` (the registered model's) then ``extra_seeds``."""
        return (self.seed, *self.extra_seeds)
